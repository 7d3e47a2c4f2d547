"""The config schema: which keys each section takes (this project's and Vega's), and the limits
on a config's shape. Data only.

Every key of Vega's schema is either honoured (it is in a set of ours) or reported once as
ignored (it is in :data:`_VEGA_IGNORED`); a key in neither is an error naming its key path.
Vega's sets were read from huawei-noah/vega at commit 12e37a1 (2023-02-15, the newest); each set
names the Vega file it comes from. Vega's own loader accepts any key (``ConfigSerializable``
sets unknown attributes silently), so "Vega's schema" is the attributes its config classes
declare, the keys its code reads and the keys its documentation lists.
"""
from __future__ import annotations

import re

ROLES = ("fine_tune", "serial", "reignition", "parallel", "full_train")

#: Vega keys accepted but not used (reported once as ignored), per section kind. Entries named
#: ``<kind>.<key>`` (``trainer.metric``) list the keys of a Vega section that is ignored as a
#: whole: the section is reported once and a key in neither set inside it is still an error.
_VEGA_IGNORED: dict[str, set[str]] = {
    # vega/common/general.py (General; TF_CPP_MIN_LOG_LEVEL...; step_name is set by Vega's
    # pipeline itself, not by users) and docs/en/user/config_reference.md ("timeout")
    "general": {"backend", "device_category", "TF_CPP_MIN_LOG_LEVEL", "cluster", "worker", "logger", "env",
                "calc_params_each_epoch", "dft", "workers_num", "quota", "data_format", "parallel_search",
                "parallel_fully_train", "devices_per_trainer", "clean_worker_dir", "requires", "message_port",
                "python_command", "device_evaluate_before_train", "ms_execute_mode", "dataset_sink_mode", "security",
                "skip_trainer_error", "timeout"},
    # vega/common/general.py (TaskConfig; local_base_path is ours)
    "general.task": {"task_id", "output_subpath", "best_model_subpath", "log_subpath", "result_subpath",
                     "worker_subpath", "backup_base_path", "use_dloop"},
    # vega/core/pipeline/conf.py (PipeStepConfig: a step's own keys; a step-level models_folder is
    # declared there but only pipe_step.models_folder is read)
    "step": {"evaluator", "evaluator_enable", "models_folder"},
    # vega/core/pipeline/train_pipe_step.py (pipe_step.get("hps_folder"), .get("load_weights"))
    "pipe_step": {"hps_folder", "load_weights"},
    # vega/networks/model_config.py (ModelConfig)
    "model": {"type", "model_desc_file", "head"},
    # vega/trainer/conf.py (TrainerConfig attributes and rules(); amp, use_amp, grad_clip and
    # valid_interval are honoured, see _VEGA_ALIASES)
    "trainer": {"task", "actions_list", "with_valid", "max_train_steps", "is_detection_trainer", "is_gan_trainer",
                "distributed", "save_model_desc", "save_ext_model", "save_slave_model", "report_freq", "seed",
                "syncbn", "keep_batchnorm_fp32", "opt_level", "lazy_built", "pretrained_model_file",
                "model_statistics", "metric", "loss", "limits", "init_model_file", "unrolled", "model_desc_file",
                "codec", "model_desc", "hps_file", "loss_scale", "save_steps", "report_on_valid", "perfs_cmp_mode",
                "perfs_cmp_key", "call_metrics_on_train", "report_on_epoch", "calc_params_each_epoch", "model_path",
                "get_train_metric_after_epoch", "kwargs", "train_verbose", "valid_verbose", "train_report_steps",
                "valid_report_steps", "load_checkpoint", "save_checkpoint", "load_weights_file",
                "use_unsupervised_pretrain", "calc_latency", "train_in_once", "mixup", "multi_task",
                "adaptive_muti_loss", "eval_per_epoch", "script", "use_dag_forward", "apex_loss_scale",
                "apex_combine_grad"},
    # vega/trainer/conf.py (MetricsConfig) and vega/trainer/modules/conf/loss.py (LossConfig):
    # whole sections, ignored (box AP via pycocotools and torchvision's losses are built in)
    "trainer.metric": {"type", "params"},
    "trainer.loss": {"type", "params"},
    # vega/trainer/modules/conf/optim.py (OptimMappingDict, SGD) and the torch.optim.SGD arguments
    # Vega passes through (dampening, nesterov)
    "optimizer.params": {"no_decay_params", "loss_scale", "dampening", "nesterov"},
    # vega/trainer/modules/conf/lr_scheduler.py (LrSchedulerConfig: type, params) and
    # vega/trainer/modules/lr_schedulers/lr_scheduler.py (reads by_epoch): all honoured
    "lr_scheduler": set(),
    # vega/trainer/modules/lr_schedulers/warmup_scheduler_torch.py: all honoured
    "WarmupScheduler": set(),
    # torch.optim.lr_scheduler (Vega's PyTorch backend registers torch's classes) and
    # vega/trainer/modules/lr_schedulers/multistep.py, cosine_annealing.py (its TF backend)
    "MultiStepLR": {"last_epoch", "verbose", "warmup", "warmup_epochs"},
    "CosineAnnealingLR": {"last_epoch", "verbose", "warmup", "warmup_epochs"},
    # vega/datasets/conf/dataset.py (DatasetConfig: type, common, train, test) and coco.py,
    # imagenet.py (val): all honoured
    "dataset": set(),
    # vega/datasets/conf/base.py (BaseConfig) and coco.py (CocoCommonConfig, CocoTrainConfig)
    "dataset.CocoDataset": {"imgs_per_gpu", "shuffle", "distributed", "download", "pin_memory", "drop_last",
                            "transforms", "buffer_size", "num_classes", "test_size"},
    # vega/datasets/conf/base.py (BaseConfig) and imagenet.py (ImagenetCommonConfig, *TrainConfig...)
    "dataset.Imagenet": {"imgs_per_gpu", "shuffle", "distributed", "download", "pin_memory", "drop_last",
                         "transforms", "buffer_size", "num_workers", "n_class", "num_parallel_batches",
                         "num_parallel_calls", "fp16", "image_size", "train_portion", "num_images"},
    # vega/algorithms/nas/sp_nas/conf.py (SpNasConfig: max_optimal) and
    # docs/en/user/config_reference.md section 3.1 (codec, policy, range of every search algorithm)
    "search_algorithm": {"max_optimal", "codec", "policy", "range"},
    # vega/core/search_space/search_space.py (condition, forbidden), vega/core/pipeline/conf.py
    # (SearchSpaceConfig rules: modules), vega/core/search_space/ext_hyper_parameter.py (prune_ratio)
    "search_space": {"condition", "forbidden", "modules", "prune_ratio"},
    # vega/core/search_space/search_space.py (form_desc reads slice, generator, sample_num)
    "hyperparameter": {"slice", "generator", "sample_num"},
}
#: Vega's spelling -> this project's, for trainer keys both honour (vega/trainer/conf.py,
#: trainer_torch.py: use_amp, grad_clip -> clip_grad_norm_, valid_interval -> validation every N epochs).
_VEGA_ALIASES = {"use_amp": "amp", "grad_clip": "clip_grad_norm", "valid_interval": "eval_every"}
#: Keys a ``ref:`` does not copy from its target, as Vega's ``UserConfig.merge_reference``
#: (vega/common/user_config.py): a step that refs ``fine_tune.trainer`` does not inherit its
#: ``with_train: False`` or its callbacks.
_REF_NOT_MERGED = ("callbacks", "lazy_built", "max_train_steps", "with_train", "with_vaild")

_GENERAL_OURS = {"seed", "workers", "device", "local_base_path", "task", "control"}
_GENERAL_TASK_OURS = {"local_base_path"}  # general.task.local_base_path: Vega's place for it
_STEP_KEYS = {"pipe_step", "search_algorithm", "search_space", "model", "trainer", "dataset", "top_k"}
_PIPE_STEP_KEYS = {"type", "models_folder"}
_SEARCH_KEYS = {"type", "max_sample", "objective_keys", "num_mutate", "add_stage_ratio", "expend_ratio",
                "expand_ratio", "max_stages", "min_stages", "min_blocks", "max_blocks", "max_per_stage", "max_params",
                "max_gflops", "flops_size", "max_redraws", "candidates_per_round", "seed", "max_memory_mb",
                "max_latency_ms", "memory_batch", "reignition_patience", "max_reignitions", "max_swap_shift",
                "width_ratio", "refresh_seeds"}
_SEARCH_SPACE_KEYS = {"type", "hyperparameters"}
_HYPERPARAMETER_KEYS = {"key", "type", "range"}
_TRAINER_KEYS = {"type", "epochs", "iters", "with_train", "optimizer", "lr_scheduler", "callbacks", "clip_grad_norm",
                 "amp", "eval_every", "checkpoint_every", "image_size", "lr_scaling", "lr_reference_batch", "norm_eval",
                 "recalibrate_images", "head_iters", "channels_last", "cudnn_benchmark", "pin_memory",
                 *_VEGA_ALIASES}
_OPTIMIZER_KEYS = {"type", "params"}
_SGD_KEYS = {"lr", "momentum", "weight_decay"}
_LR_SCHEDULER_KEYS = {"type", "params", "by_epoch"}
#: Parameters of each lr scheduler type (``params``) this project honours.
_SCHEDULER_PARAMS = {"WarmupScheduler": {"warmup_type", "warmup_iters", "warmup_ratio", "after_scheduler_config"},
                     "MultiStepLR": {"milestones", "gamma"},
                     "CosineAnnealingLR": {"T_max", "eta_min"}}
_DATASET_KEYS = {"type", "common", "train", "val", "test"}
_DATASET_COMMON = {"data_root", "data_path", "batch_size", "img_prefix", "ann_prefix", "num_workers"}
_DATASET_IMAGENET = {"data_root", "data_path", "batch_size"}  # a reignition's classification folder
_MODEL_KEYS = {"pretrained_model_file", "model_desc", "models_folder"}

#: Limits on a config's shape, so that a hostile file (a YAML alias bomb, a self-referencing
#: anchor, a fan-out of refs) fails fast with a ConfigError instead of exhausting time or memory.
MAX_VALUES = 100_000
MAX_DEPTH = 64
MAX_REF_CHAIN = 20
#: Step names become folder names (``<workdir>/output/<step>/``) and object-store prefixes.
_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
