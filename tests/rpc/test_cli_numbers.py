"""Every numeric option of ``generate``, ``serve`` and ``jobs create``, swept with extreme values: the command
exits 0, 1 (the server refused, one ``error:`` line naming the field) or 2 (one usage line naming the option) —
never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.cli
from server.cli import main
from server.training.commands import CONFIG_FLAGS

GENERATE_OPTIONS = ("max-new-tokens", "temperature", "top-p", "top-k", "repetition-penalty", "seed", "timeout")
SERVE_OPTIONS = ("port", "metrics-port", "adapter-slots", "cpu-adapter-cache", "max-batch-size", "max-lora-rank",
                 "prefill-tokens", "kv-cache-bytes", "kv-block-size", "grpc-workers", "max-upload-bytes",
                 "shutdown-grace")
JOBS_OPTIONS = tuple(name.replace("_", "-") for name, typ, _ in CONFIG_FLAGS if typ not in (str, bool))

#: Numbers as a user might type them: huge and tiny integers, floats of every kind, spellings argparse must refuse.
NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from([str(2**31 - 1), str(2**31), str(2**63), str(2**64), "-1", "0", "1"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "-1e999", "1e-320", "-0.0", "0x10", "", " ", "1_000",
                     "3.4e38", "3.5e38", "1e10", "9" * 40]),
)
SWEEP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _outcome(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run ``main(argv)``; the exit status and stderr's lines. Any exception but SystemExit fails the test."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def _check(code: int, err: list[str], option: str) -> None:
    field = option.replace("-", "_")
    assert not any("Traceback" in line for line in err), err
    if code == 0:
        return
    assert code in (1, 2) and len(err) == 1, (code, err)
    if code == 2 and "argument --" in err[0]:
        assert f"argument --{option}:" in err[0], err
    elif code == 1:  # the server's answer: a refusal names the field; a tiny --timeout may simply expire
        assert err[0].startswith("error: ") and ("INVALID_ARGUMENT" not in err[0] or f"{field}:" in err[0]), err
    else:
        assert f"{field}:" in err[0] or "model:" in err[0], err


@SWEEP
@given(option=st.sampled_from(GENERATE_OPTIONS), value=NUMBERS)
def test_generate_numeric_options(address, capsys, option, value):
    code, err = _outcome(["generate", "--target", address, "--prompt", "hi", f"--{option}={value}"], capsys)
    _check(code, err, option)


@SWEEP
@given(option=st.sampled_from(SERVE_OPTIONS), value=NUMBERS)
def test_serve_numeric_options(tmp_path, capsys, monkeypatch, option, value):
    # The model does not exist, so a run whose numbers are all valid binds its ports, then ends with "model: …".
    monkeypatch.setattr(server.cli, "_configure_logging", lambda log_json: None)
    argv = ["serve", "--host", "127.0.0.1", "--port=0", "--metrics-port=0", "--model", str(tmp_path / "none"),
            "--state-dir", str(tmp_path / "state"), "--adapters-dir", str(tmp_path / "adapters"), f"--{option}={value}"]
    code, err = _outcome(argv, capsys)
    assert code == 2, err
    _check(code, err, option)


@SWEEP
@given(option=st.sampled_from(JOBS_OPTIONS), value=NUMBERS)
def test_jobs_create_numeric_options(address, capsys, option, value):
    argv = ["jobs", "create", "--target", address, "--adapter-id", "a", "--dataset", "/srv/d.jsonl",
            f"--{option}={value}"]
    code, err = _outcome(argv, capsys)
    if code == 1:
        assert len(err) == 1 and f"config.{option.replace('-', '_')}:" in err[0], err
    else:
        _check(code, err, option)


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "x", "--max-new-tokens", "99999999999"],
    ["generate", "--prompt", "x", "--seed", "-1"],
    ["generate", "--prompt", "x", "--top-p", "nan"],
    ["generate", "--prompt", "x", "--timeout", "1e10"],
    ["serve", "--port", "70000"],
    ["serve", "--max-batch-size", "0"],
    ["serve", "--prefill-tokens", "0"],
    ["serve", "--kv-cache-bytes", "-1"],
    ["serve", "--kv-block-size", "0"],
    ["serve", "--kv-block-size", "4096"],
    ["serve", "--cuda-graphs", "maybe"],
    ["jobs", "create", "--adapter-id", "a", "--dataset", "d", "--lora-alpha", "1e39"],
])
def test_out_of_range_is_one_usage_line_naming_the_option(argv, capsys):
    code, err = _outcome(argv, capsys)
    option = next(a for a in argv[1:] if a.startswith("--") and a not in ("--prompt", "--adapter-id", "--dataset"))
    assert code == 2 and len(err) == 1 and f"argument {option}: " in err[0], err


@pytest.mark.parametrize("flags, expected", [
    ([], {}),
    (["--prefill-tokens", "512", "--kv-cache-bytes", "1073741824", "--kv-block-size", "32", "--cuda-graphs", "off"],
     {"prefill_tokens": 512, "kv_cache_bytes": 2**30, "kv_block_size": 32, "cuda_graphs": False}),
    (["--kv-cache-bytes", "0", "--cuda-graphs", "on"], {"kv_cache_bytes": 0, "cuda_graphs": True}),
])
def test_serve_engine_options_reach_the_config(flags, expected):
    from server.cli import build_parser, config_from_args
    from server.config import EngineConfig

    engine = config_from_args(build_parser().parse_args(["serve", *flags])).engine
    defaults = EngineConfig()
    for name in ("prefill_tokens", "kv_cache_bytes", "kv_block_size", "cuda_graphs"):
        assert getattr(engine, name) == expected.get(name, getattr(defaults, name)), name


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), 1e10, "30"])
def test_the_client_refuses_a_deadline_grpc_cannot_keep(timeout):
    from server.rpc.client import Client, ClientError

    with pytest.raises(ClientError) as info:
        Client("127.0.0.1:1", timeout=timeout)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.message.startswith("timeout: ")
