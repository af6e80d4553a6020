"""Errors a user can cause and fix: the CLI prints them as one line, without a traceback."""


class SelfsupError(Exception):
    """A problem with the user's input (a path, an option, a file's contents).

    The message names the file or option and says what was expected.
    """


class NonFiniteLossError(SelfsupError):
    """The training loss became NaN or infinite."""


def one_line(error: Exception) -> str:
    """`error`'s message on one line. An error raised in a DataLoader worker reaches the main
    process with the worker's traceback as its message; its own message is that text's last
    line ("selfsup.core.errors.SelfsupError: MESSAGE")."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].partition(": ")[2] or text
    return " ".join(text.split())


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def numpy_file_reason(path: object, error: BaseException) -> str:
    """Why `np.load(path, allow_pickle=False)` failed, on one line. numpy takes any file that is
    neither a zip (.npz) nor an array header (.npy) for pickled data and suggests loading it
    unsafely; such a file is simply not a NumPy file, and is said to be one."""
    try:
        with open(str(path), "rb") as f:
            head = f.read(6)
    except OSError:
        head = b""
    if not head.startswith((b"PK", b"\x93NUMPY")):
        return "not a readable .npz or .npy file: neither a zip archive nor a NumPy array header"
    return first_line(error)
