"""`edgeexit deploy BUNDLE --inventory hosts.yml`: the deploy of every host of an Ansible
inventory, in parallel, driven by Ansible rather than by a loop of ours.

The playbook (``edgeexit/ansible/deploy.yml``, role ``edgeexit_deploy``) runs on the devices the
same commands `edgeexit deploy` runs over ssh (the pre-flight probe, the runtime install,
``python -m edgeexit.remote``, `edgeexit engines`, `edgeexit profile`), so Ansible's inventory,
connection settings, ``become``, forks and ``--limit`` all apply. What runs here is this
module, called by the playbook on localhost:

- ``prepare``: check the bundle, build the runtime wheel, write the test split for profiling,
  and hand the playbook the facts it needs (digests, the wheels, the probe and install commands);
- ``pack``: the archive of what one device's bundle lacks (its `remote state` on stdin);
- ``merge``: every device's profile into the bundle under its own key, then, with a budget,
  one calibration on the worst of those profiles, so the thresholds hold on every device;
- ``report``: the per-host table (runtime, upload, engines built or reused, batch-1
  latency, thresholds, failures).

Run the playbook with ``ansible-playbook -i hosts.yml deploy.yml -e edgeexit_bundle=PATH`` or
through `edgeexit deploy --inventory`, which uses ansible-runner and prints one line per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgeexit.deploy import (INSTALL_BYTES, INSTALL_RUNTIME, DeployError, Options, batch1_ms, calibrate_on,
                             check_wheels, device_layout, engines_note, manifest_digest, merge_profiles, pack_delta,
                             probe_source, profile_sizes, runtime_wheels, save_test_split, say)
from edgeexit.errors import EdgeExitError
from edgeexit.jsonio import dumps
from edgeexit.remote import answer

PLAYBOOK = Path(__file__).parent / "ansible" / "deploy.yml"
RUN, MERGED = "run.json", "merged.json"
# the Options the playbook takes, each as an edgeexit_<name> variable (ssh settings are the inventory's)
PLAYBOOK_OPTIONS = ("path", "profile", "budget_ms", "tail", "batch", "backend", "iters", "device", "wheel",
                    "wheelhouse", "python", "engines", "quiet")


def _option(field: dataclasses.Field, value: Any) -> Any:
    """An Options value from Ansible's extra vars (``-e key=value`` gives strings)."""
    kind = field.type
    if kind == "bool" and isinstance(value, str):
        if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise EdgeExitError(f"edgeexit_{field.name}: {value!r} is not true or false")
        return value.lower() in ("true", "yes", "1")
    try:
        if kind == "bool":
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float | None":
            return float(value)
    except (TypeError, ValueError):
        raise EdgeExitError(f"edgeexit_{field.name}: {value!r} is not a number") from None
    return str(value)


def fleet_options(given: dict[str, Any]) -> Options:
    """Options from the playbook's edgeexit_* variables (unset or empty ones take deploy's defaults)."""
    from calibration.solvers import TAILS
    from edgeexit.spec import BACKENDS

    fields = {f.name: f for f in dataclasses.fields(Options)}
    unknown = sorted(set(given) - set(PLAYBOOK_OPTIONS))
    if unknown:
        raise EdgeExitError(f"fleet: unknown option(s) {', '.join(unknown)}")
    opts = Options(**{k: _option(fields[k], v) for k, v in given.items() if v is not None and v != ""})
    if opts.budget_ms is not None and opts.budget_ms <= 0:
        raise EdgeExitError(f"edgeexit_budget_ms: {opts.budget_ms:g} must be above 0")
    if opts.tail not in TAILS or opts.backend not in BACKENDS or opts.batch < 1 or opts.iters < 1:
        raise EdgeExitError(f"fleet: tail {opts.tail!r} (one of {', '.join(TAILS)}), backend {opts.backend!r} (one of "
                            f"{', '.join(BACKENDS)}), batch {opts.batch} and iters {opts.iters} (>= 1) do not all hold")
    return opts


def prepare(bundle_path: str, given: dict[str, Any], work: str | None = None) -> dict[str, Any]:
    """Everything the playbook needs from here, also written to WORK/run.json for `merge` and
    `report`: the bundle's digest and size, the wheels, the options, the commands."""
    from edgeexit.bundle import load_bundle
    from edgeexit.wheel import code_digest

    bundle = load_bundle(bundle_path)
    opts = fleet_options(given)
    device_layout(opts.path, bundle.name)  # refuses a relative or '$' path; each host's own comes from `layout`
    folder = Path(work) if work else Path(tempfile.mkdtemp(prefix="edgeexit-fleet-"))
    for sub in ("profiles", "hosts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    wheel, extra = runtime_wheels(opts, str(folder))
    save_test_split(bundle, folder / "test.npz")  # a host may profile by its own edgeexit_profile
    run = {
        "bundle": str(bundle.path.resolve()), "name": bundle.name, "digest": manifest_digest(bundle)[0],
        "bundle_bytes": sum((bundle.path / rel).stat().st_size for rel in bundle.present),
        "install_bytes": INSTALL_BYTES, "code": code_digest(), "wheel": str(wheel.resolve()),
        "wheelhouse": [str(p.resolve()) for p in extra],
        "work": str(folder.resolve()), "owns_work": work is None, "local_python": sys.executable,
        "probe": probe_source(), "install": INSTALL_RUNTIME, "options": dataclasses.asdict(opts),
        "profile_data": str((folder / "test.npz").resolve()),
        "batches": ",".join(map(str, profile_sizes(bundle, opts.batch))),
    }
    (folder / RUN).write_text(dumps(run) + "\n")
    return run


def merge(work: str) -> dict[str, Any]:
    """Merge the profiles the devices sent back (WORK/profiles/HOST.json, from hosts that came
    through) into the bundle, one key per device, and calibrate with the budget on the worst
    of them; the bundle's new digest is what every device must end with. A failure is written
    to WORK/merged.json too, so the table can say why no device was switched."""
    from edgeexit.bundle import load_bundle
    from edgeexit.profile import profile_key

    folder = Path(work)
    try:
        run = json.loads((folder / RUN).read_text())
        opts = Options(**run["options"])
        bundle = load_bundle(run["bundle"])
        profiles = {}
        for path in sorted((folder / "profiles").glob("*.json")):
            record = folder / "hosts" / path.name
            if record.is_file() and not json.loads(record.read_text()).get("failed"):
                profiles[path.stem] = json.loads(path.read_text())
        plain = {host: profile_key(e["backend"], e["device"]) for host, e in profiles.items()}
        count = Counter(plain.values())
        keys = {host: f"{key} [{host}]" if count[key] > 1 else key for host, key in plain.items()}  # one per device
        entries = {keys[host]: entry for host, entry in profiles.items()}
        record = None
        if entries:
            bundle = merge_profiles(bundle, entries)
            say(f"fleet: {len(entries)} profile(s) merged into {bundle.path / 'profile.json'}", opts.quiet)
            if opts.budget_ms is not None:
                bundle, record = calibrate_on(bundle, list(entries), opts, "fleet")
    except (EdgeExitError, OSError, ValueError) as exc:
        (folder / MERGED).write_text(dumps({"error": " ".join(str(exc).split())}) + "\n")
        raise
    merged = {"digest": manifest_digest(bundle)[0], "keys": keys, "profiles": len(entries),
              "thresholds": None if record is None else record["thresholds"],
              "modelled_ms": {} if record is None else _modelled(record, keys)}
    (folder / MERGED).write_text(dumps(merged) + "\n")
    return merged


def _modelled(record: dict[str, Any], keys: dict[str, str]) -> dict[str, float]:
    """Each host's modelled mean call latency on the test split at the calibrated thresholds."""
    devices = record.get("devices")
    return {host: (devices[f"profile.json[{key}]"] if devices else record["test"])["mean_ms"]
            for host, key in keys.items()}


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def report(work: str, unreachable: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The per-host table of a fleet deploy and the hosts that failed. `unreachable`: what
    Ansible said of hosts it could not reach (a host the play targeted that left no record at
    all was unreachable too)."""
    folder = Path(work)
    merged = json.loads((folder / MERGED).read_text()) if (folder / MERGED).is_file() else {}
    outcomes = {p.stem: json.loads(p.read_text()) for p in sorted((folder / "hosts").glob("*.json"))}
    targets = json.loads((folder / "targets.json").read_text()) if (folder / "targets.json").is_file() else []
    for host, message in (unreachable or {}).items():
        if host not in outcomes or not (outcomes[host].get("verified") or outcomes[host].get("failed")):
            outcomes[host] = {**outcomes.get(host, {}), "failed": {"step": "connect", "error": message}}
    for host in targets:  # no record at all: never reached
        outcomes.setdefault(host, {"failed": {"step": "connect", "error": "unreachable (Ansible's output says why)"}})
    header = ("host", "device", "runtime", "upload", "engines", "batch 1 ms", "thresholds", "modelled ms", "result")
    rows, failed = [], []
    for host, o in sorted(outcomes.items()):
        sent = o.get("uploaded") or []
        profile = folder / "profiles" / f"{host}.json"
        thresholds = merged.get("thresholds") if o.get("verified") else None
        plan = o.get("engine_set")
        result = ("ok" if o.get("verified") else f"FAILED at {o['failed']['step']}: {o['failed']['error']}"
                  if o.get("failed") else "not switched: " + ("merge failed" if merged.get("error") else "not finished"))
        rows.append((
            host, _cell(o.get("device")),
            "-" if "installed" not in o else ("installed" if o["installed"] else "up to date"),
            "-" if "installed" not in o else f"{sum(s['files'] for s in sent)} files "
                                             f"({sum(s['bytes'] for s in sent) / (1 << 20):.2f} MiB)",
            "-" if plan is None else engines_note(plan, o.get("engines_built", False)),
            _cell(batch1_ms(json.loads(profile.read_text())) if profile.is_file() else None, "{:.3f}"),
            "-" if thresholds is None else ", ".join("never" if t is None else f"{t:.4g}" for t in thresholds),
            _cell(merged.get("modelled_ms", {}).get(host) if o.get("verified") else None, "{:.3f}"), result))
        if not o.get("verified"):
            failed.append(host)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in [header, *rows]]
    if merged.get("error"):
        lines.append(f"merge and calibration here failed, so no device was switched: {merged['error']}")
    elif merged.get("thresholds") is not None:
        lines.append(f"thresholds calibrated on the worst of {len(merged['keys'])} device profile(s): the budget "
                     "holds on each (modelled ms: the test split's mean call on that device's profile)")
    return "\n".join(lines), failed


def _report_json(work: str) -> dict[str, Any]:
    """`report` for the playbook: the table's lines and the failed hosts."""
    table, failed = report(work)
    return {"table": table.splitlines(), "failed": failed}


_QUIET_ACTIONS = ("include_tasks", "include_role", "set_fact", "debug")  # bookkeeping, not steps


def _runner_events(verbose: bool, unreachable: dict[str, str]):
    """ansible-runner's event handler: one line per task and host, unreachable hosts noted."""
    def handle(event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        kind, host, task = event.get("event", ""), data.get("host"), data.get("task", "")
        res = data.get("res") or {}
        if kind == "runner_on_unreachable":
            unreachable[host] = " ".join(str(res.get("msg", "unreachable")).removeprefix("Task failed: ").split())[:200]
            say(f"{host}: {task}: unreachable ({unreachable[host]})", not verbose)
        elif (kind in ("runner_on_ok", "runner_on_failed") and host and not task.startswith("_")
              and data.get("task_action", "").rsplit(".", 1)[-1] not in _QUIET_ACTIONS):
            if kind == "runner_on_failed" and data.get("ignore_errors"):
                return True
            state = "failed" if kind == "runner_on_failed" else ("changed" if res.get("changed") else "ok")
            say(f"{host}: {task}: {state}" + (f" ({res['msg']})" if state == "failed" and res.get("msg") else ""),
                not verbose)
        return True
    return handle


def deploy_fleet(bundle_path: str, inventory: str, opts: Options, limit: str | None = None,
                 forks: int | None = None) -> str:
    """Run the fleet playbook on the inventory's hosts (those `limit`, an Ansible host pattern,
    selects) through ansible-runner, from the current folder (so its ansible.cfg applies); returns
    the per-host table, or prints it and raises DeployError naming the hosts that failed."""
    from edgeexit.bundle import load_bundle

    try:
        import ansible_runner
    except ImportError:
        raise EdgeExitError("deploy --inventory: ansible-runner is not installed (pip install 'edgeexit[fleet]')") \
            from None
    if opts.ssh_config or opts.ssh_options:
        raise EdgeExitError("deploy --inventory: --ssh-config and -o do not apply; set ansible_ssh_common_args "
                            "in the inventory")
    if not Path(inventory).is_file():
        raise EdgeExitError(f"--inventory: {inventory} is not a file")
    # refused here, before Ansible starts: a broken bundle, a bad wheel or option, a relative --path
    opts = dataclasses.replace(opts, **{k: str(Path(v).resolve()) for k in ("wheel", "wheelhouse")
                                        if (v := getattr(opts, k))})
    check_wheels(opts)
    device_layout(opts.path, load_bundle(bundle_path).name)
    defaults = dataclasses.asdict(Options())  # options left at their defaults yield to the inventory's host vars
    given = {k: v for k, v in dataclasses.asdict(opts).items() if k in PLAYBOOK_OPTIONS and v != defaults[k]}
    fleet_options(given)
    unreachable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="edgeexit-fleet-") as tmp:
        work = Path(tmp) / "work"
        (Path(tmp) / "runner").mkdir()
        env = {"ANSIBLE_PYTHON_INTERPRETER": os.environ.get("ANSIBLE_PYTHON_INTERPRETER", "auto_silent"),
               "ANSIBLE_NOCOLOR": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = ansible_runner.run(
            private_data_dir=str(Path(tmp) / "runner"), project_dir=os.getcwd(), playbook=str(PLAYBOOK),
            inventory=str(Path(inventory).resolve()),
            extravars={"edgeexit_bundle": str(Path(bundle_path).resolve()), "edgeexit_work": str(work),
                       "edgeexit_local_python": sys.executable, **({"edgeexit_hosts": limit} if limit else {}),
                       **{f"edgeexit_{k}": v for k, v in given.items()}},
            forks=forks, envvars=env, quiet=True, event_handler=_runner_events(not opts.quiet, unreachable))
        if not (work / RUN).is_file():
            tail = " ".join((result.stdout.read() if result.stdout else "").split()[-40:])
            raise EdgeExitError(f"deploy --inventory: the playbook stopped before it started ({result.status}): {tail}")
        targets = work / "targets.json"
        if not (targets.is_file() and json.loads(targets.read_text())):
            raise EdgeExitError(f"deploy --inventory: no host of {inventory} matched {limit or 'all'} (an empty "
                                "inventory, or one Ansible cannot parse: `ansible-inventory -i FILE --list` says why)")
        table, failed = report(str(work), unreachable)
    if failed:
        print(table)
        raise DeployError(f"deploy: {len(failed)} host(s) failed: {', '.join(failed)} (the table says where; their "
                          "previous bundles are in place)")
    return table


def main(argv: list[str] | None = None) -> int:
    """The playbook's local steps: prepare, pack, merge, report (JSON or the table on stdout)."""
    p = argparse.ArgumentParser(prog="python -m edgeexit.fleet")
    sub = p.add_subparsers(dest="op", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("bundle")
    pr.add_argument("options", help="JSON object of Options fields (the playbook's edgeexit_* variables)")
    pr.add_argument("--work")
    pk = sub.add_parser("pack")
    pk.add_argument("bundle")
    pk.add_argument("dest")
    lay = sub.add_parser("layout")
    lay.add_argument("path")
    lay.add_argument("name")
    for name in ("merge", "report"):
        sub.add_parser(name).add_argument("work")
    args = p.parse_args(argv)

    def pack() -> dict[str, Any]:
        from edgeexit.bundle import load_bundle

        return pack_delta(load_bundle(args.bundle), json.loads(sys.stdin.read()), Path(args.dest)) or {"files": 0}

    ops = {"prepare": lambda: prepare(args.bundle, json.loads(args.options), args.work or None), "pack": pack,
           "layout": lambda: device_layout(args.path, args.name), "merge": lambda: merge(args.work),
           "report": lambda: _report_json(args.work)}
    return answer(ops[args.op], (EdgeExitError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
