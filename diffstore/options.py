"""One definition per stage's options: a dataclass whose fields carry type, default and help text. The CLI's
options (`command`, registered by cli.py), the API's keyword signature (`api`: `help(ds.extract)`) and the payload
shipped to dask workers are all built from it, so adding an option is one edit.

    @dataclass(frozen=True)
    class ExtractOptions(ModelOptions):
        t: tuple[int, ...] = opt((10, 50, 150, 300), "Time steps.", flag="--t")

Types: a field typed tuple[X, ...] is a list. The command line takes it as a comma list ("10,50"); Python takes a
scalar, a sequence or the same comma string. `Options.build` checks every value by its type, choices and minimum,
once, and refuses a wrong one naming the parameter as its caller spells it (`--t` on the command line, `t=` from
Python); deeper checks call `spell(field)` for the same spelling. Torch-free: `diffstore --help` reads these.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from importlib import import_module

from .errors import DiffstoreError
from .key import DEFAULT_STORE

STORE_HELP = "Store path or fsspec URL (s3://bucket/team.zarr)."
JSON_HELP = "Machine-readable JSON on stdout (data: paths, lists, ints, bytes)."
CSV_HELP = "The results as a CSV table on stdout (one tidy row each)."
STYLE = contextvars.ContextVar("diffstore_option_style", default="api")  # "cli" while a command parses and runs


def opt(default, help: str, *, flag: str | None = None, short: str | None = None, choices: tuple | None = None,
        min: float | None = None, cli: bool = True):
    """A dataclass field with its help text. flag: the CLI spelling when it is not --field-name; cli=False: a
    Python-only option (e.g. a callback)."""
    meta = {"help": help, "flag": flag, "short": short, "choices": choices, "min": min, "cli": cli}
    return field(default=default, metadata=meta)


def device_opt(note: str = ""):
    """`device`: where the work runs (`note`: what it does not change)."""
    return opt("auto", f"auto | cpu | cuda | cuda:N{f' ({note})' if note else ''}.")


def progress_opt():
    """`show_progress` (Python), `--progress/--quiet` and `-q` (CLI): progress lines on stderr."""
    return opt(True, "Progress on stderr (--quiet, -q: none).", flag="--progress/--quiet", short=" /-q")


PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format_opt():
    """`plot_format` / `--plot-format png,pdf,svg`: each figure in each format."""
    return opt(("png",), "Figure formats (comma-separated): png, pdf, svg.", choices=PLOT_FORMATS)


def dpi_opt():
    """`dpi` / `--dpi`: the resolution of PNG figures (and of a heatmap's raster in PDF and SVG)."""
    return opt(200, "Resolution of PNG figures in dots per inch (200: sharp at a paper's column width).", min=10)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def spell(name: str, cls: type | None = None) -> str:
    """A parameter as the current caller spells it: `--batch-size` (CLI) or `batch_size=` (Python)."""
    if STYLE.get() == "cli":
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
        return flag_of(f) if f is not None else f"--{name.replace('_', '-')}"
    return f"{name}="


def is_list(hint) -> bool:
    return list_item(hint) is not None


def list_item(hint):
    """X for tuple[X, ...] or tuple[X, ...] | None; else None."""
    for h in (hint, *[a for a in typing.get_args(hint) if a is not type(None)]):
        if typing.get_origin(h) is tuple:
            return typing.get_args(h)[0]
    return None


def scalar_types(hint) -> tuple:
    """The accepted scalar types of a (possibly optional, possibly union) annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def cast_item(value, kind, name: str):
    """One list item or scalar as `kind` (int, float, str, bool); numpy scalars and digit strings for numbers."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if not isinstance(value, bool) and hasattr(value, "__index__"):
            return int(value.__index__())
    elif kind is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif not isinstance(value, bool) and isinstance(value, (int, float)) or hasattr(value, "__float__"):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise DiffstoreError(f"{name} takes {kind.__name__} values, got {value!r}")


def coerce(value, hint, name: str):
    """`value` as the field's type: lists from comma strings, scalars or sequences; optional None kept."""
    if value is None:
        if optional(hint):
            return None
        raise DiffstoreError(f"{name} needs a value, got None")
    item = list_item(hint)
    if item is not None:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, (list, tuple, set, frozenset)) or type(value).__name__ == "ndarray":
            parts = list(value)
        else:
            parts = [value]
        try:
            return tuple(cast_item(p, item, name) for p in parts)
        except DiffstoreError:
            raise DiffstoreError(f"{name} takes {item.__name__} values (a comma list such as 10,50, or a sequence), "
                                 f"got {value!r}") from None
    kinds = scalar_types(hint)
    for kind in kinds:
        try:
            return cast_item(value, kind, name)
        except DiffstoreError:
            continue
    raise DiffstoreError(f"{name} takes {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def check_folder(options, *names: str) -> None:
    """Refuse, before any work is done, an output-folder option that names an existing file."""
    from pathlib import Path

    for name in names:
        value = getattr(options, name)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise DiffstoreError(f"{spell(name, type(options))} {value}: a file is there; pass a folder (it is created "
                                 "if absent)")


class Options:
    """Base of every stage's options dataclass: built and checked from keywords (Python) or parsed flags (CLI)."""

    @classmethod
    def build(cls, values: dict | None = None, **kw) -> "Options":
        """The options from `values` (missing ones take their defaults); every value checked by its field."""
        values = {**(values or {}), **kw}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in fields]
        if unknown:
            hints_ = [f"{spell(k)} (did you mean {spell(close[0], cls)}?)"
                      if (close := difflib.get_close_matches(k, fields, n=1)) else spell(k) for k in unknown]
            raise DiffstoreError(f"unknown option {', '.join(hints_)} for {cls.__name__}; see help() for the list")
        out = {}
        for name, value in values.items():
            f = fields[name]
            where = spell(name, cls)
            value = coerce(value, hints[name], where)
            choices, low = f.metadata.get("choices"), f.metadata.get("min")
            for v in value if isinstance(value, tuple) else (value,):
                if v is None:
                    continue
                if choices is not None and v not in choices:
                    raise DiffstoreError(f"{where} must be one of {', '.join(map(str, choices))}, got {v!r}")
                if low is not None and v < low:
                    raise DiffstoreError(f"{where} must be >= {low:g}, got {v!r}")
            out[name] = value
        return cls(**out)

    def replace(self, **kw) -> "Options":
        """A copy with some options changed (checked like build)."""
        return type(self).build({**dataclasses.asdict(self), **kw})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def signature(cls: type, first: tuple[str, ...] = ("store",), extra: list[inspect.Parameter] = ()) -> inspect.Signature:
    """The API's keyword signature of an options class: `first` positional-or-keyword, the rest keyword-only."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                annotation=hints[f.name]) for f in fields if f.name in first]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in fields if f.name not in first]
    return inspect.Signature([*params, *extra])


def describe(cls: type) -> str:
    """The options as a docstring section: name, default and meaning, one per line."""
    lines = []
    for f in dataclasses.fields(cls):
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else repr(f.default)
        lines.append(f"    {f.name} = {default}: {f.metadata.get('help', '')}")
    return "Options (a list option takes a scalar, a sequence or a comma string):\n" + "\n".join(lines)


def api(cls: type, first: tuple[str, ...] = ("store",)):
    """Decorator: fn(options) becomes fn(store, *, option=..., ...) with the options' signature and help text.
    Keywords are checked by `cls.build` (unknown ones refused with the closest name)."""
    def wrap(run):
        def call(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:  # an unknown keyword is named (with the closest option) by build
                cls.build({k: v for k, v in kwargs.items() if k not in sig.parameters})
                raise DiffstoreError(f"{run.__name__}(): {e}; see help() for its options") from None
            return run(cls.build(bound.arguments))

        sig = signature(cls, first)
        call.__signature__ = sig
        call.__name__, call.__qualname__, call.__module__ = run.__name__, run.__qualname__, run.__module__
        call.__doc__ = f"{(run.__doc__ or '').rstrip()}\n\n{describe(cls)}"
        call.__wrapped_options__ = cls
        return call

    return wrap


def cli_parameter(f: dataclasses.Field, hint, argument: bool) -> inspect.Parameter:
    """The typer parameter of one options field: lists as comma strings (or, as arguments, words), booleans as
    --x/--no-x."""
    import typer

    if argument:  # a list of words: `repair KEY KEY`
        info = typer.Argument(None, help=f.metadata.get("help"), show_default=False)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[list[str]],
                                 default=info)
    default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    if is_list(hint):
        hint, default = typing.Optional[str], default or None
    flag = flag_of(f)
    boolean = hint in (bool, typing.Optional[bool])
    decls = [f"{flag}/--no-{flag[2:]}" if "/" not in flag else flag] if boolean else [flag]
    info = typer.Option(default, *decls, *([f.metadata["short"]] if f.metadata.get("short") else []),
                        help=f.metadata.get("help"))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hint, default=info)


def command(cls: type, run: typing.Callable, help: str, arguments: tuple[str, ...] = (), csv: bool = False):
    """The CLI's function for an options class, as `api` is Python's: the fields of `cls` as typer parameters,
    plus --json (and --csv). `run(options, fmt)` (fmt: "json", "csv" or None) imports its stage when called.
    Values are checked by `cls.build`, with the CLI's spelling of each option in errors."""
    import typer

    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    params = [cli_parameter(f, hints[f.name], f.name in arguments) for f in fields]
    flags = {"as_json": typer.Option(False, "--json", help=JSON_HELP)}
    if csv:
        flags["as_csv"] = typer.Option(False, "--csv", help=CSV_HELP)
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=v)
               for k, v in flags.items()]

    def call(**kw):
        as_json, as_csv = kw.pop("as_json", False), kw.pop("as_csv", False)
        if as_json and as_csv:
            raise DiffstoreError("pass --json or --csv, not both")
        kw = {k: (tuple(v or ()) if k in arguments else v) for k, v in kw.items()}
        token = STYLE.set("cli")  # errors name options as flags while this command runs (and only then)
        try:
            run(cls.build(kw), "json" if as_json else "csv" if as_csv else None)
        finally:
            STYLE.reset(token)

    call.__signature__ = inspect.Signature(params)
    call.__doc__ = help
    return call


class StagePackage(types.ModuleType):
    """The class of the stage packages (diffstore.extract, .probe, .cka): calling the package runs its API function,
    `<package>.stage.<name>`, so `ds.probe(...)` works while `import diffstore.probe.solve` and
    `from diffstore.probe import LinearProbe` stay ordinary imports (a function named like a subpackage would be
    replaced by the subpackage as soon as it is imported). `inspect.signature(ds.probe)` is the function's."""

    def function(self):
        name = self.__name__.rpartition(".")[2]
        return getattr(import_module(f"{self.__name__}.stage"), name)

    def __call__(self, *args, **kwargs):
        return self.function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.function())


@dataclass(frozen=True)
class StoreOptions(Options):
    store: str = opt(DEFAULT_STORE, STORE_HELP, short="-s")


@dataclass(frozen=True)
class ModelOptions(Options):
    """How a model is named and loaded (models.load_model's arguments): shared by extract, repair and blocks."""

    model: str = opt("default", "default | FOLDER | owner/name | adm:PATH.pt | sd:PATH_OR_ID | dit:PATH_OR_ID | "
                                "py:FILE.py:FACTORY")
    model_name: str | None = opt(None, "Name of the model in store paths (default: from the folder/id).")
    random_init: int | None = opt(None, "Same architecture, random weights with this seed (the control).", min=0)
    adm_config: str | None = opt(None, "ADM config: 256-uncond, 256-cond, 128-cond, 64-cond or a JSON file.")
    class_label: str | None = opt(None, "Class-conditional ADM/DiT: a class index N, or 'dataset' (the dataset's "
                                        "labels). Default: ADM the dataset's labels, DiT its null class.")
    prompt: str = opt("", "Stable Diffusion prompt ('' = the paper's null text).")
    resolution: int | None = opt(None, "Stable Diffusion input resolution (default: the model's).", min=8)

    def model_spec(self) -> dict:
        """load_model's keyword arguments (plain values: what dask workers receive)."""
        return {"spec": self.model, "name": self.model_name, "random_init": self.random_init,
                "adm_config": self.adm_config, "class_label": self.class_label, "prompt": self.prompt,
                "resolution": self.resolution}
