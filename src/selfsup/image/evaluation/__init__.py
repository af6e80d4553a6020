"""Evaluating representations: frozen-feature probes, fine-tuning and few-label comparisons."""

from .features import extract_features
from .few_label import (
    check_options,
    few_label_evaluation,
    flip_labels,
    labeled_subset,
    supervised_reference,
    supervised_rule,
)
from .finetune import Classifier, classifier_accuracy, finetune, fit_classifier
from .probes import kmeans_scores, knn_accuracy, linear_probe
from .report import (
    format_table,
    noise_levels,
    plot_few_label,
    plot_label_noise,
    summarize,
    write_results,
)

__all__ = [
    "check_options",
    "Classifier",
    "classifier_accuracy",
    "extract_features",
    "few_label_evaluation",
    "finetune",
    "fit_classifier",
    "format_table",
    "kmeans_scores",
    "knn_accuracy",
    "labeled_subset",
    "linear_probe",
    "noise_levels",
    "flip_labels",
    "plot_few_label",
    "plot_label_noise",
    "summarize",
    "supervised_reference",
    "supervised_rule",
    "write_results",
]
