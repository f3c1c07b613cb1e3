"""The web UI's JSON API, through FastAPI's TestClient: every action, and bad input refused with
one clear message and nothing written. Training jobs are real processes on the tiny Llama."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from lora_scripts.cli import main as cli_main
from lora_scripts.config import TrainConfig, load_config, parse_overrides, validate_config
from lora_scripts.ui import form
from lora_scripts.ui.app import create_app
from lora_scripts.ui.context import UiSettings
from tests.helpers import REPO, run_cli
from tests.image_helpers import save_image
from tests.ui_helpers import JOB_ENV, text_values, wait_for

ROOT_REFUSAL = "is outside the folders this UI may use"


def make_client(tmp_path: Path, model_dir: Path, token: str | None = None, scheduler: bool = True) -> TestClient:
    settings = UiSettings(state_dir=tmp_path / "state", cwd=tmp_path, token=token, allowed_roots=[model_dir],
                          scheduler=scheduler, job_env=JOB_ENV)
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


@pytest.fixture
def client(tmp_path: Path, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # relative config paths mean the same to the UI and its jobs
    with make_client(tmp_path, tiny_llm_dir) as test_client:
        yield test_client


def nothing_written(tmp_path: Path, client: TestClient) -> None:
    assert client.get("/api/jobs").json() == []
    assert not (tmp_path / "state" / "jobs").exists()
    assert not (tmp_path / "out").exists()


# ---- config page ---------------------------------------------------------------------------

def test_schema_is_every_key_grouped_with_its_doc(client: TestClient) -> None:
    schema = client.get("/api/schema").json()
    fields = {f["name"]: f for f in schema["fields"]}
    assert list(fields) == list(TrainConfig.model_fields)
    assert fields["lora_rank"]["group"] == "LoRA" and fields["lora_rank"]["default"] == "8"
    assert fields["lr_scheduler"]["kind"] == "choice" and fields["lr_scheduler"]["choices"] == ["constant", "linear", "cosine"]
    assert fields["base_model"]["required"] and fields["base_model"]["description"] == TrainConfig.model_fields["base_model"].description
    assert schema["groups"][:3] == ["what to train", "LoRA", "optimisation"]


def test_validation_messages_are_the_clis_text_under_their_keys(client: TestClient, tmp_path: Path) -> None:
    values = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "lora_rank": "0", "learning_rate": "fast", "lora_rnk": "4"}
    result = client.post("/api/config/validate", json={"values": values}).json()
    config = tmp_path / "bad.yaml"
    config.write_text(form.to_yaml(form.values_to_raw(values)), encoding="utf-8")
    cli = run_cli("config", "--check", str(config))
    assert cli.returncode == 2
    cli_lines = cli.stderr.removeprefix("error: ").strip().replace(f"{config}: ", "config: ").splitlines()
    assert not result["ok"] and result["message"].splitlines() == cli_lines and len(cli_lines) == 3
    assert result["errors"]["lora_rank"] == ["config: `lora_rank` = 0: Input should be greater than or equal to 1"]
    assert "did you mean `lora_rank`?" in result["errors"]["lora_rnk"][0]
    assert "learning_rate" in result["errors"]
    combo = client.post("/api/config/validate", json={"values": {**values, "lora_rank": "4", "learning_rate": "1e-3", "random_crop": "true"} | {"lora_rnk": ""}}).json()
    assert combo["errors"]["random_crop"] == combo["errors"]["cache_latents"] == [
        "random_crop needs a new crop every time, which cached latents cannot give; set cache_latents: false"]


def test_yaml_export_and_import_round_trip_with_the_cli(client: TestClient, tmp_path: Path) -> None:
    preset = client.get("/api/presets").json()
    name = next(p["name"] for p in preset if p["name"].endswith("smollm2_json.yaml"))
    values = client.get("/api/presets/values", params={"name": name}).json()["values"]
    assert values["learning_rate"] == "2e-3" and values["base_model"].startswith("pkg:")
    values |= {"prompt_template": "问：{question}\n答：{answer}", "target_modules": "[q_proj, v_proj]", "warmup_steps": "",
               "weight_decay": "1.0e-05", "max_grad_norm": "null", "train_on_inputs": "true", "output_name": "yes"}
    exported = client.post("/api/config/export", json={"values": values}).json()["yaml"]
    path = tmp_path / "exported.yaml"
    path.write_text(exported, encoding="utf-8")
    expected = validate_config(form.values_to_raw(values)).model_dump()
    assert load_config(path).model_dump() == expected
    assert "warmup_steps" not in yaml.safe_load(exported)  # a cleared field is unset, as an absent YAML key
    imported = client.post("/api/config/import", json={"text": exported, "filename": "exported.yaml"}).json()["values"]
    assert form.values_to_raw(imported) == form.values_to_raw(values)
    assert client.post("/api/config/export", json={"values": imported}).json()["yaml"] == exported
    broken = client.post("/api/config/import", json={"text": "lora_rank: [1\n", "filename": "x.yaml"})
    assert broken.status_code == 400 and broken.json()["error"].startswith("x.yaml line 2: not valid YAML")


def test_shown_command_is_the_preset_plus_overrides(client: TestClient) -> None:
    name = next(p["name"] for p in client.get("/api/presets").json() if p["name"].endswith("smollm2_json.yaml"))
    values = client.get("/api/presets/values", params={"name": name}).json()["values"]
    values |= {"lora_rank": "8", "prompt_template": "Q: {q}\nA: {a}", "learning_rate": "0.0005", "warmup_steps": ""}
    result = client.post("/api/config/command", json={"values": values, "preset": name}).json()
    argv = result["argv"]
    assert argv[:4] == ["lora-scripts", "train", "--config", name]
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    assert sorted(parse_overrides(overrides)) == ["learning_rate", "lora_rank", "prompt_template", "warmup_steps"]
    assert load_config(REPO / name if not Path(name).is_absolute() else name, overrides).model_dump() == \
        validate_config(form.values_to_raw(values)).model_dump()
    assert "--set 'prompt_template=\"Q: {q}\\nA: {a}\"'" in result["shell"]


def test_save_yaml_writes_inside_roots_only_and_never_over_a_file(client: TestClient, tmp_path: Path) -> None:
    values = {"base_model": "m", "train_data_dir": "d", "output_dir": "o"}
    saved = client.post("/api/config/save", json={"values": values, "path": "configs/run.yaml"})
    assert saved.status_code == 200 and yaml.safe_load((tmp_path / "configs/run.yaml").read_text()) == {"base_model": "m", "train_data_dir": "d", "output_dir": "o"}
    again = client.post("/api/config/save", json={"values": values, "path": "configs/run.yaml"})
    assert again.status_code == 400 and "already exists" in again.json()["error"]
    outside = client.post("/api/config/save", json={"values": values, "path": "/etc/lora_ui_test.yaml"})
    assert outside.status_code == 400 and ROOT_REFUSAL in outside.json()["error"]
    assert not Path("/etc/lora_ui_test.yaml").exists()


# ---- bad input when queueing -------------------------------------------------------------

def test_invalid_config_is_refused_with_the_clis_message_and_nothing_written(client: TestClient, tmp_path: Path, tiny_llm_dir: Path) -> None:
    response = client.post("/api/jobs", json={"values": text_values(tmp_path, tiny_llm_dir, "out", lora_rank="0")})
    assert response.status_code == 400
    assert response.json()["error"] == "config: `lora_rank` = 0: Input should be greater than or equal to 1"
    nothing_written(tmp_path, client)


def test_missing_data_folder_is_refused_before_queueing(client: TestClient, tmp_path: Path, tiny_llm_dir: Path) -> None:
    values = text_values(tmp_path, tiny_llm_dir, "out", train_data_dir="no_such_data.jsonl")
    response = client.post("/api/jobs", json={"values": values})
    assert response.status_code == 400 and "no_such_data.jsonl" in response.json()["error"]
    image_values = {"task_type": "image", "base_model": "sd.safetensors", "train_data_dir": "missing_images", "output_dir": "out"}
    doctor = client.post("/api/data/check", json={"values": image_values})
    assert doctor.json() == {"error": "train_data_dir missing_images is not a folder; check the path in your config"}
    nothing_written(tmp_path, client)


def test_paths_outside_the_allowed_roots_are_refused(client: TestClient, tmp_path: Path, tiny_llm_dir: Path) -> None:
    response = client.post("/api/jobs", json={"values": text_values(tmp_path, tiny_llm_dir, "/var/tmp/lora_ui_out")})
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"`output_dir` /var/tmp/lora_ui_out {ROOT_REFUSAL} ({tmp_path}, {tmp_path / 'state'}, {tiny_llm_dir})")
    assert not Path("/var/tmp/lora_ui_out").exists()
    for path, call in [("/etc/hostname", lambda p: client.get("/api/thumb", params={"path": p})),
                       ("/etc", lambda p: client.post("/api/data/label", json={"input": p, "output": "/etc/m.csv"}))]:
        refused = call(path)
        assert refused.status_code == 400 and ROOT_REFUSAL in refused.json()["error"]
    validation = client.post("/api/config/validate", json={"values": text_values(tmp_path, tiny_llm_dir, "../elsewhere")}).json()
    assert not validation["ok"] and ROOT_REFUSAL in validation["errors"]["output_dir"][0]
    nothing_written(tmp_path, client)


def test_access_rules_token_host_and_origin(tmp_path: Path, tiny_llm_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["ui", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")]) == 2
    assert "--host 0.0.0.0 lets other machines reach the UI; also pass --token" in capsys.readouterr().err
    with make_client(tmp_path, tiny_llm_dir, token="s3cret", scheduler=False) as tokened:
        assert tokened.get("/api/jobs").status_code == 401
        assert tokened.get("/api/jobs", headers={"X-LoRA-Token": "wrong"}).status_code == 401
        assert tokened.get("/api/jobs", headers={"X-LoRA-Token": "s3cret"}).status_code == 200
        assert tokened.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = tokened.get("/", params={"token": "s3cret"})
        assert page.status_code == 200 and "lora_ui_token=s3cret" in page.headers["set-cookie"]
        assert tokened.get("/static/app.js").status_code == 200  # the cookie now carries the token
        tokened.cookies.clear()
        assert tokened.get("/static/app.js").status_code == 401
    with make_client(tmp_path, tiny_llm_dir, scheduler=False) as local:
        assert local.get("/api/jobs", headers={"Host": "evil.example:7860"}).status_code == 403
        cross = local.post("/api/config/export", json={"values": {}}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403 and "another site" in cross.json()["error"]
        assert local.post("/api/config/export", json={"values": {}}, headers={"Origin": "http://127.0.0.1"}).status_code == 200


# ---- data page -----------------------------------------------------------------------------

def test_doctor_thumbnails_and_caption_edits(client: TestClient, tmp_path: Path) -> None:
    data = tmp_path / "style"
    for i in range(3):
        save_image(data / f"img{i}.png", (96, 96), seed=i)
    (data / "img3.png").write_bytes((data / "img0.png").read_bytes())  # an exact duplicate
    (data / "broken.png").write_bytes(b"not a png")
    (data / "metadata.csv").write_bytes("\ufefffilename,prompt\nimg0.png,a cat\nimg1.png,\"a dog, running\"\nimg2.png,a cow\nimg3.png,a cat\nbroken.png,x\n".encode())
    values = {"task_type": "image", "base_model": "models/sd15.safetensors", "train_data_dir": "style", "output_dir": "out"}
    report = client.post("/api/data/check", json={"values": values}).json()
    findings = {f["check"]: f for f in report["findings"]}
    assert findings["unreadable"]["items"] == ["broken.png"] and findings["unreadable"]["blocking"]
    assert "img3.png" in findings["exact_duplicate"]["items"]
    thumb = client.get(findings["exact_duplicate"]["thumbs"]["img3.png"])
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (96, 96)

    listed = client.post("/api/data/captions", json={"values": values}).json()
    assert [(i["rel"], i["caption"]) for i in listed["images"]][:2] == [("img0.png", "a cat"), ("img1.png", "a dog, running")]
    edited = client.post("/api/data/caption", json={"values": values, "rel": "img1.png", "caption": "a dog,\n jumping"})
    assert edited.json()["caption"] == "a dog, jumping"
    assert (data / "metadata.csv").read_bytes() == "\ufefffilename,prompt\nimg0.png,a cat\nimg1.png,\"a dog, jumping\"\nimg2.png,a cow\nimg3.png,a cat\nbroken.png,x\n".encode()
    assert not list(data.glob(".tmp-*"))
    unknown = client.post("/api/data/caption", json={"values": values, "rel": "../x.png", "caption": "y"})
    assert unknown.status_code == 400 and "is not an image of" in unknown.json()["error"]

    (data / "metadata.csv").unlink()
    sidecar_values = values | {"train_data_dir": "style"}
    client.post("/api/data/caption", json={"values": sidecar_values, "rel": "img2.png", "caption": "a brown cow"}).raise_for_status()
    assert (data / "img2.txt").read_text(encoding="utf-8") == "a brown cow"


def test_label_job_captions_a_folder(client: TestClient, tmp_path: Path) -> None:
    from tests.tiny_clip import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    data = tmp_path / "photos"
    for i, colour in enumerate(["red", "blue"]):
        data.mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), colour).save(data / f"p{i}.png")
    bad = client.post("/api/data/label", json={"input": "photos", "model": "clip", "top_k": 0, "output": "photos/metadata.csv"})
    assert bad.status_code == 400 and bad.json()["error"] == "label: argument --top-k: must be >= 1, got 0"
    assert client.post("/api/data/label", json={"input": "photos", "model": "clip"}).json()["error"].startswith("nothing to write")
    job = client.post("/api/data/label", json={"input": "photos", "model": str(clip), "labels": ["a red square", "a blue square"],
                                                "trigger": "sq", "sidecars": True}).json()
    assert job["kind"] == "label" and job["args"][:3] == ["label", "--input", str(data)]
    done = wait_for(lambda: (j := client.get(f"/api/jobs/{job['id']}").json())["status"] in ("done", "failed") and j, 300, "the label job")
    assert done["status"] == "done", client.get(f"/api/jobs/{job['id']}/live").json()["log"]
    assert all((data / f"p{i}.txt").read_text().startswith("sq, a ") for i in range(2))


# ---- jobs: queue, live view, stop, resume, remove, re-run, downloads, compare ---------------

def test_job_lifecycle(client: TestClient, tmp_path: Path, tiny_llm_dir: Path) -> None:
    job = lambda job_id: client.get(f"/api/jobs/{job_id}").json()  # noqa: E731
    first = client.post("/api/jobs", json={"values": text_values(tmp_path, tiny_llm_dir, "out_a", validation_split="0.2"), "name": "a"}).json()
    second = client.post("/api/jobs", json={"values": text_values(tmp_path, tiny_llm_dir, "out_b", max_steps="40", save_steps="0")}).json()
    assert (first["status"], second["status"], second["name"]) == ("running", "queued", "out_b")  # one at a time
    busy = client.post("/api/jobs", json={"values": text_values(tmp_path, tiny_llm_dir, "out_b")})
    assert busy.json()["error"] == f"output_dir out_b is already used by job {second['id']} (queued); choose another output_dir"
    assert client.delete(f"/api/jobs/{first['id']}").json()["error"] == f"job {first['id']} is running; stop it first"

    wait_for(lambda: job(first["id"])["status"] == "done", 300, "the first run to finish")
    live = client.get(f"/api/jobs/{first['id']}/live").json()
    assert live["progress"] == {"step": 6, "total": 6}
    assert [step for step, _ in live["scalars"]["loss"]] == [1, 2, 3, 4, 5, 6] and live["scalars"]["eval_loss"][-1][0] == 6
    assert {"lr", "tokens_per_sec", "grad_norm"} <= set(live["scalars"])
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.yaml", "loss_curve.png"} <= {f["name"] for f in live["files"]}
    lora = client.get(f"/api/jobs/{first['id']}/output/adapter_model.safetensors", params={"download": 1})
    assert lora.content == (tmp_path / "out_a/adapter_model.safetensors").read_bytes() and "attachment" in lora.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/jobs/{first['id']}/download.zip").content))
    assert "out_a/adapter_model.safetensors" in archive.namelist()
    assert client.get(f"/api/jobs/{first['id']}/output/../state/ui.sqlite3").status_code in (400, 404)
    held = client.post("/api/jobs", json={"values": text_values(tmp_path, tiny_llm_dir, "out_a")})
    assert held.json()["error"] == "output_dir out_a already holds a run (step_6); set resume: true to continue it, or choose a new output_dir"

    # the second started when the first finished; stop it gracefully, then resume it
    wait_for(lambda: (client.get(f"/api/jobs/{second['id']}/live").json()["progress"] or {}).get("step", 0) >= 2, 300, "the second run's steps")
    with make_client(tmp_path, tiny_llm_dir, scheduler=False) as restarted:  # a new UI on the same state re-attaches
        restarted.app.state.ui.runner.tick()
        assert [j["status"] for j in restarted.get("/api/jobs").json()] == ["done", "running"]
    assert client.post(f"/api/jobs/{second['id']}/stop").json()["status"] == "stopping"
    stopped = wait_for(lambda: (j := job(second["id"]))["status"] == "stopped" and j, 300, "the graceful stop")
    assert stopped["error"] == "stopped with a checkpoint; resume continues it" and stopped["exit_code"] == 0
    assert client.get(f"/api/jobs/{second['id']}/live").json()["checkpoints"]
    resumed = client.post(f"/api/jobs/{second['id']}/resume").json()
    assert resumed["status"] == "running" and resumed["args"][-2:] == ["--set", "resume=true"]
    wait_for(lambda: job(second["id"])["status"] == "done", 300, "the resumed run to finish")
    live = client.get(f"/api/jobs/{second['id']}/live").json()
    assert [step for step, _ in live["scalars"]["loss"]] == list(range(1, 41))
    assert any("resumed from" in line for line in live["log"])

    # re-run with changes; stopped before it trains; removed (its output_dir is never deleted)
    rerun = client.post(f"/api/jobs/{first['id']}/rerun", json={"changes": {"output_dir": "out_c", "lora_rank": "2"}}).json()
    assert yaml.safe_load(job(rerun["id"])["yaml"])["lora_rank"] == 2 and rerun["output_dir"] == str(tmp_path / "out_c")
    client.post(f"/api/jobs/{rerun['id']}/stop").raise_for_status()
    wait_for(lambda: job(rerun["id"])["status"] == "stopped", 300, "the stop of a starting run")
    assert client.delete(f"/api/jobs/{rerun['id']}").status_code == 200
    assert client.get(f"/api/jobs/{rerun['id']}").json()["error"] == f"no job {rerun['id']}; it may have been removed"
    assert not (tmp_path / "state/jobs" / str(rerun["id"])).exists() and (tmp_path / "out_a").is_dir()

    compared = client.get("/api/compare", params={"ids": [first["id"], second["id"]]}).json()
    assert compared["differing"]["max_steps"] == [6, 40] and compared["differing"]["validation_split"] == [0.2, 0.0]
    assert [len(run["loss"]) for run in compared["runs"]] == [6, 40] and "lora_rank" not in compared["differing"]
    for out, steps in (("out_a", (0, 3, 6)), ("out_b", (0, 6, 40))):  # as the image task writes its samples
        for step in steps:
            save_image(tmp_path / out / "samples" / f"step_{step}.png", (32, 32), seed=step)
    assert client.get("/api/compare", params={"ids": [first["id"], second["id"]]}).json()["sample_steps"] == [0, 6]
    samples = client.get(f"/api/jobs/{first['id']}/live").json()["samples"]
    assert samples == [{"step": s, "path": f"samples/step_{s}.png"} for s in (0, 3, 6)]
    assert client.get(f"/api/jobs/{first['id']}/output/samples/step_3.png").headers["content-type"] == "image/png"

    assert client.put("/api/settings", json={"max_parallel": 0}).json()["error"] == "max_parallel 0: choose a number from 1 to 64"
    assert client.put("/api/settings", json={"max_parallel": 2}).json()["max_parallel"] == 2
