"""The bad-input corpus (`tests/bad_inputs/<case>/case.yaml`), run through the CLI.

Every case must exit 2 within seconds with exactly one `error:` line that contains its
`expect` text, show no traceback, and leave its folder exactly as it was: no output_dir
created, a pre-existing one untouched, no marker file from an unpickled payload.

A case.yaml holds:
  why / topic     what the mistake is; topic is one of TOPICS
  base            text (default) or image: the good tiny config the case starts from
  config          keys merged over that config (null removes a key), or
  config_text     the config file verbatim (with config_encoding, default utf-8)
  config_path     run with this --config path instead of the written one
  args            extra CLI arguments
  files           path -> generator name in bad_inputs/generators.py (binary or awkward files)
  expect          a substring of the error line
Strings may use ${case} (the case's temporary copy), ${tiny_llm}, ${good_text},
${tiny_sd} and ${good_images}. Small text data files sit beside case.yaml.
"""

from __future__ import annotations

import shutil
import string
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.bad_inputs.generators import GENERATORS, MARKER
from tests.forkserver import Finished, ForkServer
from tests.helpers import run_cli, snapshot, write_qa_jsonl

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.parent.name for p in CORPUS.glob("*/case.yaml"))
TOPICS = {"config", "security", "data", "model", "output", "image"}
TIME_LIMIT_S = 60  # a loose sanity bound: every case fails before any training
PARALLEL_RUNS = 3

BASE_CONFIGS = {
    "text": {
        "task_type": "text-generation", "base_model": "${tiny_llm}", "train_data_dir": "${good_text}",
        "prompt_template": "问：{question}\n答：{answer}", "output_dir": "${case}/out",
        "lora_rank": 4, "batch_size": 2, "max_steps": 1, "save_steps": 0,
    },
    "image": {
        "task_type": "image", "base_model": "${tiny_sd}", "train_data_dir": "${good_images}",
        "output_dir": "${case}/out", "bucket_reso_steps": 32, "lora_rank": 4, "batch_size": 1, "max_steps": 1,
        "save_steps": 0,
    },
}


@dataclass
class Outcome:
    """What one case did."""

    returncode: int
    stderr: str
    seconds: float
    before: dict[str, tuple]
    after: dict[str, tuple]


def load_case(name: str) -> dict:
    """The case's case.yaml as a dict."""
    return yaml.safe_load((CORPUS / name / "case.yaml").read_text(encoding="utf-8"))


def first_case_per_topic() -> list[str]:
    """The cases also run as a fresh process (the fork server skips Python start-up)."""
    firsts: dict[str, str] = {}
    for name in CASES:
        firsts.setdefault(load_case(name)["topic"], name)
    return sorted(firsts.values())


COLD_START_CASES = first_case_per_topic()


def _substitute(value, places: dict[str, str]):
    if isinstance(value, str):
        return string.Template(value).safe_substitute(places)
    if isinstance(value, dict):
        return {k: _substitute(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, places) for v in value]
    return value


def write_case_config(path: Path, base: str, changes: dict, places: dict[str, str]) -> None:
    """BASE_CONFIGS[base] with `changes` (None removes a key), placeholders filled in."""
    keys = {**BASE_CONFIGS[base], **changes}
    keys = {key: value for key, value in keys.items() if value is not None}
    path.write_text(yaml.safe_dump(_substitute(keys, places), allow_unicode=True, sort_keys=False), encoding="utf-8")


def prepare_case(name: str, workdir: Path, good_inputs: dict[str, Path]) -> tuple[Path, list[str]]:
    """Copy the case into `workdir`, generate its files, write its config; return (folder, CLI args)."""
    spec = load_case(name)
    folder = workdir / name
    shutil.copytree(CORPUS / name, folder, symlinks=True)
    (folder / "case.yaml").unlink()
    places = {key: str(value) for key, value in good_inputs.items()} | {"case": str(folder)}
    for rel, generator in (spec.get("files") or {}).items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        GENERATORS[generator](target, good_inputs)
    config = folder / "config.yaml"
    if "config_text" in spec:
        config.write_bytes(_substitute(spec["config_text"], places).encode(spec.get("config_encoding", "utf-8")))
    else:
        write_case_config(config, spec.get("base", "text"), spec.get("config") or {}, places)
    config_arg = _substitute(spec.get("config_path", str(config)), places)
    return folder, ["train", "--config", config_arg, *spec.get("args", [])]


def run_cases(names: list[str], workdir: Path, good_inputs: dict[str, Path], server: ForkServer | None) -> dict[str, Outcome]:
    """Prepare and run cases, PARALLEL_RUNS at a time, recording each folder before and after.

    With a fork server each case is a fork of one process that imported the CLI once (much
    faster); without, each is a fresh `python -m lora_scripts.cli`.
    """
    prepared = {name: prepare_case(name, workdir, good_inputs) for name in names}
    before = {name: snapshot(folder) for name, (folder, _) in prepared.items()}
    argvs = [args for _, args in prepared.values()]
    if server is not None:
        results = server.run_many(argvs, parallel=PARALLEL_RUNS)
    else:
        with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
            results = list(pool.map(run_cold, argvs))
    return {name: Outcome(result.returncode, result.stderr, result.seconds, before[name], snapshot(prepared[name][0]))
            for name, result in zip(names, results)}


def run_cold(argv: list[str]) -> Finished:
    """`python -m lora_scripts.cli ARGV` in a fresh process."""
    start = time.perf_counter()
    proc = run_cli(*argv, timeout=300)
    return Finished(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def _selected_cases(request, param: str) -> list[str]:
    """The cases of this module's tests that pytest selected for this session (-k, node ids)."""
    here = Path(__file__)
    return [item.callspec.params[param] for item in request.session.items
            if item.path == here and param in getattr(getattr(item, "callspec", None), "params", {})]


@pytest.fixture(scope="module")
def good_inputs(tmp_path_factory, tiny_llm_dir) -> dict[str, Path]:
    """The good inputs the cases build on."""
    from tests.tiny_sd import make_tiny_sd

    good = tmp_path_factory.mktemp("good")
    images = good / "images"
    images.mkdir()
    for index in range(2):
        GENERATORS["png_good"](images / f"{index}.png", {})
        (images / f"{index}.txt").write_text(f"ink wash painting, thing {index}\n", encoding="utf-8")
    return {"tiny_llm": tiny_llm_dir, "good_text": write_qa_jsonl(good / "qa.jsonl"),
            "tiny_sd": make_tiny_sd(good, "sd1").diffusers_dir, "good_images": images}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One fork server with both tasks imported."""
    server = ForkServer(["lora_scripts.tasks.text", "lora_scripts.tasks.image"], tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, good_inputs, server) -> dict[str, Outcome]:
    """Every selected case, run from the fork server."""
    return run_cases(_selected_cases(request, "case"), tmp_path_factory.mktemp("forked"), good_inputs, server)


@pytest.fixture(scope="module")
def cold_outcomes(request, tmp_path_factory, good_inputs) -> dict[str, Outcome]:
    """The selected COLD_START_CASES, each run as a fresh process."""
    return run_cases(_selected_cases(request, "cold_case"), tmp_path_factory.mktemp("cold"), good_inputs, None)


@pytest.mark.parametrize("base", sorted(BASE_CONFIGS))
def test_base_config_trains(base, tmp_path, good_inputs, server):
    """Each case changes one thing in a good config: the good config itself must train."""
    config = tmp_path / "config.yaml"
    write_case_config(config, base, {}, {key: str(value) for key, value in good_inputs.items()} | {"case": str(tmp_path)})
    result = server.run("train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_cleanly(case, outcomes):
    check_outcome(case, outcomes[case])


@pytest.mark.parametrize("cold_case", COLD_START_CASES)
def test_bad_input_fails_cleanly_from_a_cold_start(cold_case, cold_outcomes):
    """The fork server skips Python start-up; a sample proves a real start prints no more."""
    check_outcome(cold_case, cold_outcomes[cold_case])


def check_outcome(case: str, outcome: Outcome) -> None:
    """Exit 2, one `error:` line with the expected text, no traceback, nothing written."""
    spec = load_case(case)
    stderr = outcome.stderr.strip()
    assert outcome.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and spec["expect"] in stderr, stderr
    assert outcome.after == outcome.before, "the run wrote or changed files"
    assert outcome.seconds < TIME_LIMIT_S


def test_corpus_covers_every_kind_of_mistake():
    specs = [load_case(name) for name in CASES]
    assert len(specs) >= 40
    assert {spec["topic"] for spec in specs} == TOPICS
    for name, spec in zip(CASES, specs):
        assert spec.get("why") and spec.get("expect"), name
        assert set(spec.get("files") or {}).isdisjoint({"case.yaml", "config.yaml"}), name
        assert all(value in GENERATORS for value in (spec.get("files") or {}).values()), name


def test_debug_shows_the_traceback(tmp_path, good_inputs):
    _, args = prepare_case("data_jsonl_broken_line", tmp_path, good_inputs)
    proc = run_cli("--debug", *args, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "qa.jsonl:3: broken JSON line" in proc.stderr


def test_the_payloads_are_live(tmp_path):
    """The corpus' "no marker file" checks mean something: loaded unsafely, the payloads do run."""
    import torch

    GENERATORS["evil_pickle"](tmp_path / "model.ckpt", {})
    torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert (tmp_path / MARKER).exists()
    (tmp_path / MARKER).unlink()
    config_text = load_case("security_yaml_python_tag")["config_text"]
    yaml.unsafe_load(string.Template(config_text).safe_substitute(case=str(tmp_path)))
    assert (tmp_path / MARKER).exists()
