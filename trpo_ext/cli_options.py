"""What the command line takes for TRPO's hyperparameters: the flags a subcommand's parser defines,
the `--set KEY=VALUE` keys (the hyperparameters without a flag, with their defaults and docstrings
from trpo_ext.config, their one home), and the check of a `--set` list against both."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap

from . import presets
from .config import TRPOConfig
from .policies import BUILT_IN


class UsageError(Exception):
    """A mistake in the command line: main() prints its one-line message and returns 2."""


# ----------------------------------------------------------------------------- hyperparameters
@functools.cache
def _field_docs(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string under each field), whitespace collapsed; {}
    where its source is not available."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, SyntaxError):
        return {}
    return {node.target.id: " ".join(doc.value.value.split()) for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def hyperparameters(cls=TRPOConfig) -> dict[str, tuple[object, str]]:
    """TRPO's hyperparameters, {name: (default, docstring)}, in TRPOConfig's order (a nested
    config's fields, the trust region's, in its place): their one home is trpo_ext.config."""
    docs, found = _field_docs(cls), {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            found.update(hyperparameters(f.default_factory))
        else:
            found[f.name] = (f.default, docs.get(f.name, ""))
    return found


def flags_of(parser) -> dict[str, tuple[str, bool, object]]:
    """{dest: (how the command line says it, whether it takes a value, its default)} for each
    argument of a subcommand's parser: an option's long flag, a positional's metavar."""
    return {a.dest: (a.option_strings[-1] if a.option_strings else a.metavar or a.dest.upper(),
                     a.nargs != 0, a.default) for a in parser._actions if a.dest != "help"}


def set_keys(flags: dict) -> dict[str, tuple[object, str]]:
    """What `--set KEY=VALUE` takes: the hyperparameters without a flag of their own, and value_net
    (a built-in critic: a network of your own needs Python)."""
    keys = {name: value for name, value in hyperparameters().items() if name not in flags}
    keys["value_net"] = ("auto", f"The built-in critic: auto (the one that fits the policy) or one of "
                                 f"{', '.join(BUILT_IN)}.")
    return keys


def cli_setting(key: str, value, flags: dict) -> str:
    """`key=value` as the command line says it: `--n-steps 64`, `--normalize-obs`, `--set gamma=0.9`."""
    if key not in flags:
        return f"--set {key}={value!r}"
    flag, takes_value, _ = flags[key]
    if not takes_value:
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def hyperparameter_options(args) -> dict:
    """TRPO's keyword arguments from the command line: the hyperparameter flags given (those left
    at None are not) and the `--set` pairs. Refused here is only what the command line itself can
    get wrong (a key given twice, one with its own flag, one that is not a hyperparameter, a
    network that is not built in); the values are TRPO's to check, as in Python."""
    settable = set_keys(args.flags)
    options, seen = {}, {}
    for key, value in args.set:
        if key in seen:
            raise UsageError(f"--set {key} given twice ({key}={seen[key]!r}, {key}={value!r}): give it once")
        seen[key] = value
        if key in args.flags:
            flag, _, default = args.flags[key]
            given = getattr(args, key)
            if given != default:
                raise UsageError(f"--set {key}={value!r} conflicts with {cli_setting(key, given, args.flags)}: give "
                                 f"it once, as {flag}")
            raise UsageError(f"--set {key}=...: {key} has its own flag: use {cli_setting(key, value, args.flags)}")
        if key == "process_group":
            raise UsageError("--set process_group=...: the command line makes the process group (--nproc, torchrun)")
        if key not in settable:
            raise UsageError(f"--set: unknown hyperparameter {key!r} (known: {', '.join(settable)})")
        if key == "value_net" and value not in ("auto", *BUILT_IN):
            raise UsageError(f"--set value_net={value!r}: the command line builds the built-in critics only "
                             f"(auto, {', '.join(BUILT_IN)}); a network of your own needs Python: TRPO(value_net=...)")
        options[key] = value
    for key in hyperparameters():
        if key in args.flags and getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return {**preset_options(args), **options}


DEFAULT_TIMESTEPS = 100_000
"""`train --timesteps`' default without a preset."""


def training_budget(args) -> int:
    """`train`'s step count when --timesteps is not given: the zoo's for `--preset zoo`, else
    DEFAULT_TIMESTEPS."""
    return presets.zoo_timesteps(args.env) if getattr(args, "preset", None) == "zoo" else DEFAULT_TIMESTEPS


def preset_options(args) -> dict:
    """`--preset zoo`: trpo_ext.presets.zoo(ENV_ID), which the flags and --set given override."""
    if getattr(args, "preset", None) is None:
        return {}
    if args.resume:
        raise UsageError("--preset with --resume: a resumed run keeps its checkpoint's settings; drop --preset")
    return presets.zoo(args.env)
