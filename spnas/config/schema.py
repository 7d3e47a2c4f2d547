"""The config schema: which keys each section takes (this project's and Vega's), and the limits
on a config's shape. Data only."""
from __future__ import annotations

import re

ROLES = ("fine_tune", "serial", "reignition", "parallel", "full_train")

#: Vega keys accepted but not used (reported once as ignored), per section.
_VEGA_IGNORED = {
    "general": {"backend", "device_category", "parallel_search", "parallel_fully_train", "devices_per_trainer",
                "logger", "worker", "task", "cluster", "quota", "dft", "calc_params_each_epoch", "cluster_mode",
                "ms_execute_mode", "env", "requires", "message_port", "security", "local_base_path"},
    "trainer": {"loss", "metric", "mixup", "valid_interval", "report_freq", "save_model_desc", "perfs_cmp_mode",
                "perfs_cmp_key", "cuda", "distributed", "seed", "is_detection_trainer", "model_statistics",
                "load_checkpoint", "report_on_valid", "call_metrics_on_train", "get_train_metric_after_epoch",
                "kwargs", "visual_callback", "save_best_model", "save_checkpoint", "save_ext_model",
                "report_on_epoch", "grad_clip", "pretrained_model_file"},
    "dataset": {"shuffle", "distributed", "transforms", "pin_memory", "drop_last", "imgs_per_gpu", "test_mode"},
    "pipe_step": {"desc_file", "hps_file"},
    "search_algorithm": {"policy", "codec", "random_ratio", "num_samples"},
    "step": {"evaluator", "loss", "metric"},
}
_GENERAL_OURS = {"seed", "workers", "device"}
_STEP_KEYS = {"pipe_step", "search_algorithm", "search_space", "model", "trainer", "dataset", "top_k"}
_SEARCH_KEYS = {"type", "max_sample", "objective_keys", "num_mutate", "add_stage_ratio", "expend_ratio",
                "expand_ratio", "max_stages", "min_stages", "min_blocks", "max_blocks", "max_per_stage", "max_params",
                "max_gflops", "flops_size", "max_redraws", "candidates_per_round", "seed"}
_TRAINER_KEYS = {"type", "epochs", "iters", "with_train", "optimizer", "lr_scheduler", "callbacks", "clip_grad_norm",
                 "amp", "eval_every", "checkpoint_every", "image_size", "recalibrate_images", "head_iters"}
_DATASET_KEYS = {"type", "common", "train", "val", "test"}
_DATASET_COMMON = {"data_root", "data_path", "batch_size", "img_prefix", "ann_prefix", "num_workers"}
_MODEL_KEYS = {"pretrained_model_file", "model_desc", "models_folder"}

#: Limits on a config's shape, so that a hostile file (a YAML alias bomb, a self-referencing
#: anchor, a fan-out of refs) fails fast with a ConfigError instead of exhausting time or memory.
MAX_VALUES = 100_000
MAX_DEPTH = 64
MAX_REF_CHAIN = 20
#: Step names become folder names (``<workdir>/output/<step>/``) and object-store prefixes.
_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
