"""The `selfsup lm ...` command group (`main`), its stage commands (`align`, `words`) and
shared helpers (`common`)."""
