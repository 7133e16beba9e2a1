"""Data layer: GLUE registry and loading, task files (a user's own data), tokenisation into
length-bucketed batches, metrics.

Importing this package is cheap (numpy only): 🤗 datasets is imported only when a split is
loaded from the Hub, and tokenizers are passed in by the caller.
"""

from fisher_jax.data.batching import (
    DEFAULT_BUCKETS,
    BatchIterator,
    Encoded,
    SplitRows,
    batch_indices,
    batches,
    bucket_sizes,
    default_max_length,
    encode,
    encode_rows,
    make_batch,
    num_batches,
    sample_batches_with_replacement,
    sample_task_batches,
    select_examples,
    task_batches,
)
from fisher_jax.data.glue import (
    GLUE_DIR_ENV,
    HUB_DATASET,
    TASKS,
    Examples,
    TaskSpec,
    custom_task,
    default_metrics,
    get_task,
    iter_tasks,
    label_order,
    load_custom,
    load_split,
    normalize_split,
    read_glue_tsv,
    register_task,
    resolve_glue_dir,
)
from fisher_jax.data.taskfile import load_task_file, parse_task
from fisher_jax.data.metrics import (
    METRICS,
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    predictions_from_logits,
    spearman,
    weighted_ranks,
)

__all__ = [
    "DEFAULT_BUCKETS", "BatchIterator", "Encoded", "SplitRows", "batch_indices", "batches", "bucket_sizes",
    "default_max_length", "encode", "encode_rows", "make_batch", "num_batches",
    "sample_batches_with_replacement", "sample_task_batches", "select_examples", "task_batches",
    "GLUE_DIR_ENV", "HUB_DATASET", "TASKS", "Examples", "TaskSpec", "custom_task", "default_metrics",
    "get_task", "iter_tasks", "label_order", "load_custom", "load_split", "load_task_file", "normalize_split",
    "parse_task", "read_glue_tsv", "register_task", "resolve_glue_dir",
    "METRICS", "accuracy", "compute_metrics", "f1", "matthews_corrcoef", "pearson",
    "predictions_from_logits", "spearman", "weighted_ranks",
]
