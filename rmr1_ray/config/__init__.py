"""Typed run configs: YAML + dotted overrides, validated (see loader.py)."""

from rmr1_ray.config.jobargs import job_parser, parse_job_config
from rmr1_ray.config.loader import ConfigError, apply_overrides, load_config, read_yaml_tree, save_resolved
from rmr1_ray.config.sections import ClusterConfig, GroupConfig, ModelConfig, Strict, TrackingConfig

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "GroupConfig",
    "ModelConfig",
    "Strict",
    "TrackingConfig",
    "apply_overrides",
    "job_parser",
    "load_config",
    "parse_job_config",
    "read_yaml_tree",
    "save_resolved",
]
