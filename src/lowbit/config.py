"""The value types that say what to quantize and how: :class:`QuantConfig`, :class:`LoraSpec` and the typed
options of the initializers (:class:`MethodOptions`).

They are read by everything else -- the engine, the initializers, checkpoints, the CLI -- so this module imports
nothing of lowbit but :mod:`lowbit.quant` and :mod:`lowbit.errors`: reading a config never pulls in the code that
acts on it, and no import cycle can pass through here. A config names its initializer by name; the initializers
themselves register in :data:`INITIALIZERS`, which is how a config checks that name and its options without
importing them.

Each initializer declares its options as a frozen dataclass (``Options``, a :class:`MethodOptions`) whose fields
have types, defaults and a help line; the CLI makes one flag of each field. A :class:`QuantConfig` still holds the
options as the plain dict a checkpoint records (so checkpoints written before load unchanged) and checks it
against those dataclasses when it is made.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, Self, Union, get_args, get_origin, get_type_hints

from lowbit.errors import LowbitError
from lowbit.quant import QuantSpec


@dataclass
class LoraSpec:
    """The LoRA adapter every quantized layer gets: ``W = dequant(Q) + (alpha / rank) B A``."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def option(default: object, help: str) -> Any:
    """A field of an initializer's ``Options``: its default and the help line of its CLI flag."""
    return field(default=default, metadata={"help": help})


def flag(name: str) -> str:
    """The CLI flag of option ``name``: ``clip_lr`` -> ``--clip-lr`` (errors name options by their flags)."""
    return "--" + name.replace("_", "-")


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _checked(name: str, hint: object, value: object) -> object:
    """``value`` as option ``name`` of type ``hint`` holds it, or LowbitError naming the flag.

    An int is taken for a float (and made one); 0 or 1 for a bool, which is how checkpoints recorded flags before
    the options had types. ``X | None`` takes None.
    """
    if get_origin(hint) in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        (hint,) = (t for t in get_args(hint) if t is not type(None))
    if get_origin(hint) is Literal:
        if isinstance(value, str) and value in get_args(hint):
            return value
        raise LowbitError(f"{flag(name)} {value!r} is not known: choose {', '.join(get_args(hint))}")
    if hint not in _KINDS:
        raise TypeError(f"option {name}: type {hint} is not one an option can have ({', '.join(map(str, _KINDS))})")
    if hint is bool and type(value) is int and value in (0, 1):
        return bool(value)
    if hint is float and type(value) is int:
        return float(value)
    if type(value) is not hint:
        raise LowbitError(f"{flag(name)} must be {_KINDS[hint]}, got {value!r}")
    return value


@dataclass(frozen=True)
class MethodOptions:
    """Base of every initializer's ``Options``, and the options of a method that has none.

    A subclass is a frozen dataclass whose fields are made with :func:`option`. Construction checks each field's
    type; a subclass's ``__post_init__`` then checks the values (calling this one first). Both raise LowbitError
    naming the CLI flag, so a bad option is refused before any block is touched.
    """

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f.name, hints[f.name], getattr(self, f.name)))

    def check_at_least(self, minimum: int, *names: str) -> None:
        """Refuse a value below ``minimum`` of any of the fields ``names`` (0: learning rates, ridges, epochs)."""
        for name in names:
            if getattr(self, name) < minimum:
                raise LowbitError(f"{flag(name)} must be at least {minimum}, got {getattr(self, name)}")

    @classmethod
    def from_record(cls, options: Mapping[str, object]) -> Self:
        """This class's options out of a recorded ``options`` dict, which may hold other methods' keys too."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


@dataclass(frozen=True)
class Calibration(MethodOptions):
    """The calibration data a run used, recorded among the options whatever the method: the CLI records where its
    windows came from, and the engine holds the last ``holdout_windows`` back from the method."""

    calib: str | None = None  # ptb, self (sampled by the model: lowbit.selfcal), or the .txt / .jsonl file
    calib_temperature: float | None = None  # self: the sampling temperature
    calib_windows: int | None = None
    calib_seqlen: int | None = None
    calib_seed: int | None = None
    holdout_windows: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_at_least(0, "holdout_windows")


class Method(Protocol):
    """What a config needs to know of an initializer (:class:`lowbit.init.base.Initializer` provides it)."""

    name: ClassVar[str]
    needs_data: ClassVar[bool]
    adapter: ClassVar[bool]
    Options: ClassVar[type[MethodOptions]]


# Every initializer by name, in the order the CLI lists them. Filled by ``lowbit.init`` when it is imported, which
# ``import lowbit`` (and so the import of any lowbit module) does before any config can be made.
INITIALIZERS: dict[str, type[Method]] = {}


@dataclass
class QuantConfig:
    """What to quantize to and how to start the adapter. Validated on construction."""

    bits: int = 4
    group_size: int = 64
    format: str = "int"
    symmetric: bool = False
    init: str = "qlora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    seed: int = 0
    # The initializer's options (its ``Options`` fields) and the calibration record (:class:`Calibration`), as the
    # checkpoint records them; keys of other methods are kept and ignored (a checkpoint without an adapter loads as
    # init ``none`` but keeps the options its codes were made with).
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            _ = self.spec  # QuantSpec validates bits, format and group size
        except ValueError as exc:
            raise LowbitError(f"{exc}: choose --bits 2, 3, 4 or 8 (nf: 2, 3, 4) and a positive --group-size") from exc
        if self.init not in INITIALIZERS:
            raise LowbitError(f"unknown init {self.init!r}: choose one of {', '.join(INITIALIZERS)}")
        if INITIALIZERS[self.init].adapter and self.rank <= 0:
            raise LowbitError(f"LoRA rank must be positive for init {self.init!r}, got {self.rank}")
        known = {f.name for cls in (Calibration, *(m.Options for m in INITIALIZERS.values())) for f in fields(cls)}
        unknown = sorted(set(self.options) - known)
        if unknown:
            takes = [f.name for f in fields(INITIALIZERS[self.init].Options)]
            what = f"takes the options {', '.join(takes)}" if takes else "takes no options"
            raise LowbitError(f"unknown option {unknown[0]!r}: init {self.init} {what}")
        try:
            _ = self.method_options, self.calibration  # each checks the types and values of its own keys
        except LowbitError as exc:
            raise LowbitError(f"init {self.init}: {exc}") from exc

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.format, self.symmetric)

    @property
    def method(self) -> str:
        """Name of the weight rounding: ``rtn`` (integer round-to-nearest) or ``nf`` (NormalFloat)."""
        return "nf" if self.format == "nf" else "rtn"

    @property
    def method_options(self) -> MethodOptions:
        """The initializer's typed options, read from :attr:`options` (defaults for the keys not given)."""
        return INITIALIZERS[self.init].Options.from_record(self.options)

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_record(self.options)

    @property
    def lora(self) -> LoraSpec | None:
        return LoraSpec(self.rank, self.alpha, self.dropout) if INITIALIZERS[self.init].adapter else None

    def to_dict(self) -> dict:
        return asdict(self)
