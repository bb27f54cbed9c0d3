"""The initializers' typed options: checked when a config is made, recorded as a plain dict, one CLI flag each."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import pytest
import torch

import lowbit
from conftest import tiny_model
from lowbit.cli import _options, build_parser
from lowbit.config import INITIALIZERS, flag
from lowbit.errors import LowbitError
from lowbit.init import get_initializer
from lowbit.init.apiq_bw import ApiQBlockwise
from lowbit.init.loftq import LoftQ

# every method-option flag the CLI had before the options were typed, with its default (None: the method's own)
OLD_FLAGS = ("--epochs", "--clip-lr", "--lora-lr", "--weight-decay", "--clip-init", "--batch", "--warm-start",
             "--weight-lr", "--qparam-lr", "--second-loss", "--loftq-iters")  # fmt: skip


def test_unknown_option_is_refused_naming_it() -> None:
    with pytest.raises(LowbitError, match=r"unknown option 'epoch': init apiq-bw takes the options .*\bepochs\b"):
        lowbit.QuantConfig(bits=2, init="apiq-bw", options={"epoch": 2})
    with pytest.raises(LowbitError, match="unknown option 'iters': init qlora takes no options"):
        lowbit.QuantConfig(init="qlora", options={"iters": 2})


@pytest.mark.parametrize(
    ("init", "options", "message"),
    [
        ("apiq-bw", {"epochs": "2"}, "--epochs must be a whole number, got '2'"),
        ("apiq-bw", {"epochs": 2.5}, "--epochs must be a whole number, got 2.5"),
        ("apiq-bw", {"batch": True}, "--batch must be a whole number, got True"),
        ("apiq-lw", {"clip_lr": "fast"}, "--clip-lr must be a number, got 'fast'"),
        ("apiq-bw", {"second_loss": "yes"}, "--second-loss must be true or false, got 'yes'"),
        ("apiq-bw", {"warm_start": 1}, "--warm-start 1 is not known: choose none, wsvd, gptq"),
        ("loftq", {"loftq_iters": 2.0}, "--loftq-iters must be a whole number, got 2.0"),
        ("gptq", {"gptq_damp": None}, "--gptq-damp must be a number, got None"),
        ("gptq", {"holdout_windows": "4"}, "--holdout-windows must be a whole number, got '4'"),
    ],
)
def test_wrong_type_is_refused_naming_the_flag(init: str, options: dict, message: str) -> None:
    with pytest.raises(LowbitError, match=re.escape(f"init {init}: {message}")):
        lowbit.QuantConfig(bits=2, init=init, options=options)


def test_values_are_checked_by_each_method() -> None:
    with pytest.raises(LowbitError, match="--loftq-iters must be at least 1, got 0"):
        lowbit.QuantConfig(bits=2, init="loftq", options={"loftq_iters": 0})
    with pytest.raises(LowbitError, match="--batch must be at least 1, got 0"):
        lowbit.QuantConfig(bits=2, init="apiq-bw", options={"batch": 0})
    with pytest.raises(LowbitError, match=r"--gptq-damp must be at least 0, got -0\.1"):
        lowbit.QuantConfig(bits=2, init="gptq", options={"gptq_damp": -0.1})
    with pytest.raises(LowbitError, match="--holdout-windows must be at least 0, got -1"):
        lowbit.QuantConfig(bits=2, init="wsvd", options={"holdout_windows": -1})


def test_the_initializer_gets_typed_options_and_the_record_stays_as_given() -> None:
    # 1/0 for a bool and an int for a float are what checkpoints recorded before the options had types
    record = {"epochs": 3, "second_loss": 1, "gptq_act_order": 0, "clip_lr": 1, "calib": "ptb", "loftq_iters": 0}
    config = lowbit.QuantConfig(bits=2, init="apiq-bw", options=dict(record))
    init = get_initializer(config)
    assert isinstance(init, ApiQBlockwise) and isinstance(init.options, ApiQBlockwise.Options)
    opts = init.options
    assert (opts.epochs, opts.second_loss, opts.gptq_act_order, opts.clip_lr) == (3, True, False, 1.0)
    assert type(opts.clip_lr) is float and opts.lora_lr == 5e-4  # not given: the published recipe
    assert config.options == record and config.to_dict()["options"] == record  # what the checkpoint records
    assert config.calibration.calib == "ptb" and config.calibration.holdout_windows == 0
    assert LoftQ().options.loftq_iters == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.epochs = 4  # type: ignore[misc]


def test_a_checkpoint_keeps_options_its_loaded_init_does_not_take(tmp_path) -> None:
    """A gptq checkpoint has no adapter, so it loads as init ``none`` (no options); its record stays as written."""
    options = {"gptq_damp": 0.02, "gptq_act_order": 0}
    model = tiny_model("llama", layers=1)
    calib = torch.randint(3, 120, (2, 32), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(model, lowbit.QuantConfig(bits=2, group_size=32, init="gptq", options=options), calib, False)
    lowbit.save(model, tmp_path / "q")
    loaded, _ = lowbit.load(tmp_path / "q")
    assert loaded.lowbit_config.init == "none" and loaded.lowbit_config.options == options


def _method_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    (group,) = (g for g in parser._action_groups if g.title.startswith("method options"))
    return {s: a for a in group._group_actions for s in a.option_strings if not s.startswith("--no-")}


def test_quantize_and_adapt_parsers_expose_the_same_generated_flags() -> None:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    quantize, adapt = (_method_flags(subparsers.choices[name]) for name in ("quantize", "adapt"))
    fields = {f.name: f for m in INITIALIZERS.values() for f in dataclasses.fields(m.Options)}
    assert set(quantize) == set(adapt) == {flag(name) for name in fields}
    assert set(OLD_FLAGS) <= set(quantize)
    for option, action in quantize.items():
        assert action.default is None  # not given: not recorded, so each method takes its own default
        assert action.help == adapt[option].help and fields[action.dest].metadata["help"] in action.help
    assert quantize["--warm-start"].choices == ["none", "wsvd", "gptq"]
    assert "apiq-lw, apiq-bw: " in quantize["--epochs"].help and "blockap: " in quantize["--epochs"].help


def test_cli_records_only_the_option_flags_given_with_their_types() -> None:
    base = ["--out", "x", "--init", "apiq-bw"]
    args = build_parser().parse_args(
        ["quantize", *base, "--epochs", "3", "--clip-lr", "1e-3", "--no-gptq-act-order", "--second-loss"]
    )
    assert _options(args) == {"epochs": 3, "clip_lr": 1e-3, "gptq_act_order": False, "second_loss": True}
    assert _options(build_parser().parse_args(["adapt", *base])) == {}


def test_the_registry_is_full_whatever_module_is_imported_first() -> None:
    """``lowbit.init`` registers the initializers; importing any lowbit module imports it first (via ``lowbit``)."""
    code = "from lowbit.config import INITIALIZERS, QuantConfig; QuantConfig(init='blockap'); print(*INITIALIZERS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["none", "qlora", "loftq", "wsvd", "apiq-lw", "apiq-bw", "gptq", "blockap"]
