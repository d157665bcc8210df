"""Shell completion for `edgeexit`, generated from its own argument parser (no dependency):
`eval "$(edgeexit completion bash)"` in ~/.bashrc; zsh runs the same script through
`bashcompinit`. Completes commands, each command's options and their fixed choices, and
files elsewhere."""

from __future__ import annotations

import argparse
import shlex


def _commands(parser: argparse.ArgumentParser) -> dict[str, dict[str, list[str]]]:
    """command -> {option: its choices (empty when it takes a free value or none)}."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {flag: [str(c) for c in (action.choices or [])]
                   for action in p._actions for flag in action.option_strings if flag.startswith("--")}
            for name, p in sub.choices.items()}


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for `edgeexit` covering every command and option."""
    commands = _commands(parser)
    cases = []
    for name, options in commands.items():
        choices = "".join(f"      {flag}) COMPREPLY=($(compgen -W {shlex.quote(' '.join(c))} -- \"$cur\")); return;;\n"
                          for flag, c in options.items() if c)
        cases.append(f"    {name})\n      case \"$prev\" in\n{choices}      esac\n"
                     f"      opts={shlex.quote(' '.join(options))};;\n")
    return ("_edgeexit() {\n"
            "  local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} cmd=${COMP_WORDS[1]} opts\n"
            "  if [ \"$COMP_CWORD\" -eq 1 ]; then\n"
            f"    COMPREPLY=($(compgen -W {shlex.quote(' '.join(commands) + ' --version --help')} -- \"$cur\")); return\n"
            "  fi\n"
            "  case \"$cmd\" in\n" + "".join(cases) + "  esac\n"
            "  if [[ \"$cur\" == -* ]]; then COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\")); "
            "else COMPREPLY=($(compgen -f -- \"$cur\")); fi\n"
            "}\n"
            "complete -o filenames -F _edgeexit edgeexit\n")


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell` (bash, or zsh through bashcompinit)."""
    body = bash_script(parser)
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body
