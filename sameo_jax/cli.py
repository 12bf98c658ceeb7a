"""Command-line parsing that ends a bad command line with one `error:` line (absl flags and
ml_collections config files with their `--config.key=value` overrides)."""

from __future__ import annotations

import re

from absl import flags


def _last_line(text: str) -> str:
    """The message of a nested traceback's text: its last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def _message(error: Exception, argv: list[str]) -> str:
    text = str(error)
    if isinstance(error, AttributeError):  # --config.key naming no field of the config
        key = re.search(r"\w+", text).group(0)
        arg = next((a.split("=")[0] for a in argv
                    if re.fullmatch(rf"--\w+(\.\w+)*\.{key}(=.*)?", a)), key)
        close = re.search(r'Did you mean "(\w+)"', text)
        hint = f"; did you mean {arg.rsplit('.', 1)[0]}.{close.group(1)}?" if close else ""
        return f"{arg}: no such key in the config{hint}"
    first = text.split("\n")[0].removesuffix(":").strip()
    if "Traceback" in text:  # a config file that failed to load: where, and why
        first = first.split(": Error whilst parsing")[0].removeprefix("flag ")
        return f"{first}: {_last_line(text)}"
    return _last_line(text) if len(text.splitlines()) > 1 else text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, for `app.run(main, flags_parser=parse_flags)`: an unknown flag, a
    bad value, a config file that does not load or a `--config.key` that does not exist
    ends the program with one `error:` line naming it (and the closest valid key)."""
    try:
        rest = flags.FLAGS(argv)
        for name in flags.FLAGS:  # a config file is loaded when its value is first read
            flag = flags.FLAGS[name]
            if flag.present and type(flag).__module__.startswith("ml_collections"):
                try:  # a file that failed to load stands in as an object that raises
                    getattr(flag.value, "to_dict", None)
                except OSError as e:
                    raise SystemExit(f"error: --{name}: {_last_line(str(e))}") from None
        return rest
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise SystemExit("error: " + " ".join(_message(e, argv).split())) from None
