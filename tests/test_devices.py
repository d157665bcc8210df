"""Device profiles: shipped files load and validate, user overrides, and check_target's refusals."""

from importlib.resources import files

import pytest
import yaml

from edgeexit.devices import (
    check_target,
    format_table,
    list_devices,
    load_device,
    profile_to_dict,
)
from edgeexit.errors import EdgeExitError, SpecError

SHIPPED = [
    "host-cpu",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "jetson-agx-xavier",
    "jetson-nano",
    "jetson-orin-nano-4gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-orin-nx-8gb",
    "jetson-tx2",
    "jetson-xavier-nx",
]

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch):
    """Tests see only the shipped profiles unless they set EDGEEXIT_DEVICES themselves."""
    monkeypatch.delenv("EDGEEXIT_DEVICES", raising=False)


def _shipped_yaml(name):
    return files("edgeexit.device_profiles").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def _check(name, **overrides):
    kwargs = dict(precisions=["fp16"], use_dla=False, batch_max=1, bytes_per_sample=MIB,
                  weight_bytes=10 * MIB)
    kwargs.update(overrides)
    check_target(load_device(name), **kwargs)


def test_all_shipped_profiles_load_and_round_trip():
    profiles = list_devices()
    assert [p.name for p in profiles] == SHIPPED
    for p in profiles:
        assert profile_to_dict(p) == yaml.safe_load(_shipped_yaml(p.name))
        assert _shipped_yaml(p.name).startswith("# source:")
    table = format_table(profiles)
    assert all(name in table for name in SHIPPED)


def test_known_figures():
    nano = load_device("jetson-orin-nano-8gb")
    assert (nano.gpu.cuda_cores, nano.gpu.tensor_cores, nano.gpu.compute_capability) == (1024, 32, "8.7")
    assert nano.peak.memory_bandwidth_gbs == 68
    agx = load_device("jetson-agx-orin-64gb")
    assert (agx.gpu.cuda_cores, agx.dla_cores, agx.peak.memory_bandwidth_gbs) == (2048, 2, 204.8)
    host = load_device("host-cpu")
    assert host.kind == "host" and host.memory_gb is None and host.gpu.architecture is None


def test_unknown_device():
    with pytest.raises(SpecError) as e:
        load_device("jetson-banana")
    assert str(e.value).startswith("target.device: unknown device 'jetson-banana' (known: host-cpu, ")
    assert "jetson-nano" in str(e.value)


def test_int8_on_nano_refused():
    with pytest.raises(SpecError, match=r"^export\.precision: int8 has no fast hardware support on "
                                        r"jetson-nano \(Maxwell\); use fp16 or fp32$"):
        _check("jetson-nano", precisions=["int8"])


def test_fp16_on_host_cpu_refused():
    with pytest.raises(SpecError, match=r"^export\.precision: fp16 .* host-cpu \(onnxruntime on CPU"):
        _check("host-cpu", precisions=["fp16"])
    _check("host-cpu", precisions=["int8", "fp32"], batch_max=10**6)  # memory not checked on host


def test_dla_on_orin_nano_refused():
    with pytest.raises(SpecError) as e:
        _check("jetson-orin-nano-8gb", use_dla=True)
    msg = str(e.value)
    assert msg.startswith("target.dla: jetson-orin-nano-8gb has no DLA cores; remove target.dla")
    for listed in ("jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nx-*", "jetson-agx-orin-*"):
        assert listed in msg
    assert "jetson-orin-nano" not in msg.split("(", 1)[1]


def test_dla_accepted_on_agx_orin_with_fp16_but_not_fp32_only():
    _check("jetson-agx-orin-64gb", use_dla=True, precisions=["fp16"])
    with pytest.raises(SpecError, match=r"^target\.dla: DLA runs fp16 or int8 only"):
        _check("jetson-agx-orin-64gb", use_dla=True, precisions=["fp32"])


def test_oversized_batch_refused_with_a_max_that_fits():
    with pytest.raises(SpecError) as e:
        _check("jetson-nano", batch_max=4096, bytes_per_sample=MIB, weight_bytes=20 * MIB)
    msg = str(e.value)
    assert msg.startswith("export.batch.max: 4096 needs ~4096 MiB of activations on jetson-nano")
    assert "of 4 GB shared memory" in msg
    suggested = int(msg.rsplit("<= ", 1)[1])
    assert 0 < suggested < 4096
    _check("jetson-nano", batch_max=suggested, bytes_per_sample=MIB, weight_bytes=20 * MIB)
    with pytest.raises(SpecError):
        _check("jetson-nano", batch_max=suggested + 1, bytes_per_sample=MIB, weight_bytes=20 * MIB)


def test_weights_alone_too_big():
    with pytest.raises(SpecError, match=r"^target\.device: ~3000 MiB of weights"):
        _check("jetson-nano", weight_bytes=3000 * MIB)


def test_user_profiles_override_and_extend(tmp_path, monkeypatch):
    nano = yaml.safe_load(_shipped_yaml("jetson-nano"))
    nano["description"] = "our Nano with a custom carrier board"
    (tmp_path / "jetson-nano.yaml").write_text(yaml.safe_dump(nano))
    board = dict(nano, name="my-board", memory_gb=2, builder_workspace_mb=128)
    (tmp_path / "my-board.yaml").write_text(yaml.safe_dump(board))
    monkeypatch.setenv("EDGEEXIT_DEVICES", str(tmp_path))

    assert load_device("jetson-nano").description == "our Nano with a custom carrier board"
    assert load_device("my-board").memory_gb == 2
    assert [p.name for p in list_devices()] == sorted(SHIPPED + ["my-board"])


def test_malformed_user_profile_names_file_and_key(tmp_path, monkeypatch):
    bad = yaml.safe_load(_shipped_yaml("jetson-nano"))
    bad["name"] = "bad-board"
    bad["gpu"]["shader_units"] = 128
    path = tmp_path / "bad-board.yaml"
    path.write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("EDGEEXIT_DEVICES", str(tmp_path))
    with pytest.raises(EdgeExitError) as e:
        load_device("bad-board")
    assert str(e.value).startswith(f"{path}: gpu.shader_units: unknown key")

    del bad["gpu"]["shader_units"]
    del bad["peak"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(EdgeExitError, match=r"bad-board\.yaml: peak: missing key"):
        list_devices()

    bad["peak"] = yaml.safe_load(_shipped_yaml("jetson-nano"))["peak"]
    bad["jetpack"]["tensorrt"] = 8.2  # unquoted: YAML reads a float
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(EdgeExitError, match=r"jetpack\.tensorrt: expected str or null, got float"):
        load_device("bad-board")


def test_edgeexit_devices_must_be_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEEXIT_DEVICES", str(tmp_path / "missing"))
    with pytest.raises(EdgeExitError, match="^EDGEEXIT_DEVICES: .* is not a directory$"):
        list_devices()


@pytest.mark.parametrize("model,mem_kb,expected", [
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7_800_000, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit", 3_600_000, "jetson-orin-nano-4gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 30_000_000, "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 62_000_000, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson Xavier NX Developer Kit", None, "jetson-xavier-nx"),
    ("NVIDIA Jetson Nano Developer Kit", 4_000_000, "jetson-nano"),
])
def test_device_auto_finds_the_profile_from_the_module_and_its_memory(tmp_path, model, mem_kb, expected):
    from edgeexit.devices import detect_device

    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text(model + "\0")
    if mem_kb is not None:
        (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:  1 kB\n")
    assert detect_device(tmp_path).name == expected


def test_device_auto_refuses_what_it_cannot_tell(tmp_path):
    from edgeexit.devices import detect_device

    with pytest.raises(EdgeExitError, match="not a Jetson"):
        detect_device(tmp_path)
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Developer Kit\0")
    with pytest.raises(EdgeExitError, match="jetson-orin-nano-4gb, jetson-orin-nano-8gb.*memory"):
        detect_device(tmp_path)
    (tmp_path / "proc/device-tree/model").write_text("Raspberry Pi 5 Model B\0")
    with pytest.raises(EdgeExitError, match="no device profile matches"):
        detect_device(tmp_path)
