"""`lora-scripts check-data` from the command line, for image folders and text data."""

from __future__ import annotations

import json

from tests.helpers import run_cli, text_config, write_config
from tests.test_datacheck import build_defect_set, photo_like, write_metadata


def test_image_defects_block_with_report(tmp_path):
    root = build_defect_set(tmp_path / "case")
    config = write_config(tmp_path / "c.yaml", base_model=str(tmp_path / "no_model.safetensors"), train_data_dir=root,
                          metadata_path=root / "metadata.csv", output_dir=tmp_path / "out", task_type="image")
    proc = run_cli("check-data", "--config", str(config), "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    checks = {f["check"] for f in report["findings"]}
    assert {"exact_duplicate", "near_duplicate", "blurry", "too_small", "unreadable", "shared_caption", "caption_too_long"} <= checks
    assert report["blocking"] is True
    html = tmp_path / "report.html"
    proc = run_cli("check-data", "--config", str(config), "--html", str(html))
    assert proc.returncode == 1 and "blocking finding(s)" in proc.stdout
    assert "<img" in html.read_text(encoding="utf-8")
    assert not (tmp_path / "out").exists()


def test_clean_image_set_passes(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    captions = ["ink wash mountains", "red dress, linework", "pastel cat", "city at night", "forest path", "sea cliffs"]
    for i, caption in enumerate(captions):
        photo_like(100 + i, 560, 560).save(root / f"img{i}.png")
    write_metadata(root, [(f"img{i}.png", c) for i, c in enumerate(captions)])
    config = write_config(tmp_path / "c.yaml", base_model="nothing.safetensors", train_data_dir=root, output_dir=tmp_path / "out", task_type="image")
    proc = run_cli("check-data", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No blocking findings." in proc.stdout


def test_text_data_duplicates_and_cuts(tmp_path, tiny_llm_dir):
    data = tmp_path / "doctor.jsonl"
    rows = [{"question": "同一个问题", "answer": "同一个答案"}] * 2 + [{"question": "长" * 300, "answer": "好"}, {"question": "空", "answer": ""}]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    config = text_config(tmp_path, tiny_llm_dir, train_data_dir=str(data), max_seq_length=64)
    proc = run_cli("check-data", "--config", str(config), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    checks = {f["check"]: f for f in json.loads(proc.stdout)["findings"]}
    assert {"duplicate_sample", "empty_response", "truncated_sample"} <= set(checks)
    assert checks["truncated_sample"]["items"] == [f"{data}:3"]


def test_training_prints_data_check_summary(tmp_path, tiny_llm_dir):
    data = tmp_path / "dups.jsonl"
    rows = [{"question": "同一个问题", "answer": "同一个答案"}] * 3 + [{"question": f"问题{i}", "answer": f"答案{i}"} for i in range(5)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    config = text_config(tmp_path, tiny_llm_dir, train_data_dir=str(data), max_steps=1)
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "data check: duplicate_sample: 2" in proc.stdout
