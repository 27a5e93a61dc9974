"""Packaging beyond what pyproject.toml can say: the Hydra presets.

Users edit the presets in the top-level `conf/` of a clone (an editable install reads them
there). A wheel has no clone around it, so it ships the same files as the package data
directory `pretrain/conf`, where `launch.common.config_dir()` finds them.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pretrain", "pretrain.*", "launch", "launch.*", "tools",
                                      "tools.*"]),
              "pretrain.conf"],
    package_dir={"pretrain.conf": "conf"},
    package_data={"pretrain.conf": ["*.yaml", "*/*.yaml"]},
)
