"""The web UI end to end in Debian's headless Chromium (Playwright): fill the config form for the
tiny Llama, queue two runs, watch the loss chart grow, see the first finish and the second start,
kill the UI mid-run (the run finishes anyway), restart it and find the run finished with its curve,
in a second browser context too; then compare the runs and use the data page.
Screenshots of every page go to tests/artifacts/ui/."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.image_helpers import save_image
from tests.ui_helpers import ARTIFACTS, free_port, start_server, text_values, wait_for

CHROMIUM = "/usr/bin/chromium"  # Debian's package (`make test` installs it); Playwright never downloads a browser


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def new_page(browser):
    """A page in a fresh browser context, patient with a machine busy training (2 cores)."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(120_000)
    return page


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def api(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def listens_on_loopback_only(port: int) -> bool:
    """The listening socket of `port` in /proc/net/tcp is bound to 127.0.0.1 (0100007F)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    addresses = [row[1].split(":")[0] for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A"]
    return addresses == ["0100007F"]


def fill_form(page, values: dict[str, str]) -> None:
    for key, text in values.items():
        selector = f".field[data-key={key}] [name={key}]"
        if not page.is_visible(selector):  # its section is folded: open it, as a person would
            page.click(f"details:has({selector}) > summary")
        if page.eval_on_selector(selector, "node => node.tagName") == "SELECT":
            page.select_option(selector, text)
        else:
            page.fill(selector, text)


def job_status(page) -> str:
    return page.get_attribute("#job-status", "data-status") or ""


def chart_points(page, chart: str = "#loss-chart") -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def test_queue_watch_kill_restart_compare(tmp_path: Path, tiny_llm_dir: Path, browser) -> None:
    state, port = tmp_path / "state", free_port()
    server = start_server(tmp_path, state, port, "--allow-root", str(tiny_llm_dir), log=tmp_path / "ui.log")
    try:
        assert listens_on_loopback_only(port)
        base = f"http://127.0.0.1:{port}/"
        page = new_page(browser)
        page.goto(base + "#/config")
        page.wait_for_selector(".field[data-key=base_model].invalid")
        shot(page, "1_config_empty_form")

        # the form for a tiny run; an invalid value shows the CLI's message inline
        fill_form(page, text_values(tmp_path, tiny_llm_dir, "out_a", max_steps="150", validation_split="0.2", eval_steps="30"))
        page.fill(".field[data-key=lora_rank] [name=lora_rank]", "0")
        page.wait_for_selector(".field[data-key=lora_rank].invalid")
        assert page.inner_text(".field[data-key=lora_rank] .error") == "config: `lora_rank` = 0: Input should be greater than or equal to 1"
        page.fill(".field[data-key=lora_rank] [name=lora_rank]", "4")
        page.wait_for_selector("#validation.ok")
        page.click("#show-command")
        page.wait_for_function("document.querySelector('#command').textContent.startsWith('lora-scripts train --config config.yaml')")
        shot(page, "2_config_filled")
        page.fill("#job-name", "run-a")
        page.click("#queue")
        page.wait_for_selector("#queued a")
        fill_form(page, {"output_dir": "out_b", "max_steps": "100", "validation_split": "", "eval_steps": ""})
        page.wait_for_selector("#validation.ok")
        page.fill("#job-name", "run-b")
        page.click("#queue")
        page.wait_for_function("document.querySelector('#queued').textContent.includes('run-b')")

        page.click("#nav-jobs")
        page.wait_for_selector("#jobs tr[data-job-id='2'][data-status=queued]")
        assert page.get_attribute("#jobs tr[data-job-id='1']", "data-status") in ("queued", "running")
        shot(page, "3_jobs_queue")

        # the first run's page: the loss chart grows while it trains, then the run is done
        page.goto(base + "#/job/1")
        seen: set[int] = set()

        def first_done() -> bool:
            growing = len(seen - {0})
            seen.add(chart_points(page))
            if growing == 1 and len(seen - {0}) == 2:  # caught mid-run
                shot(page, "4_job_live")
            return job_status(page) == "done"

        wait_for(first_done, 300, "run-a to finish", every=0.3)
        wait_for(lambda: chart_points(page) == 150 + 5, 30, "the final loss chart (150 loss + 5 validation points)")
        assert len(seen - {0}) >= 2, f"the chart never showed an intermediate state: {sorted(seen)}"
        page.wait_for_selector("#files li[data-file='adapter_model.safetensors'] a")
        page.check("#log-scale")
        shot(page, "5_job_done_log_scale")

        page.goto(base + "#/jobs")
        page.wait_for_selector("#jobs tr[data-job-id='2'][data-status=running]")
        assert page.get_attribute("#jobs tr[data-job-id='1']", "data-status") == "done"

        # kill the UI while run-b trains: the run goes on by itself
        wait_for(lambda: (api(port, "/api/jobs/2/live")["progress"] or {}).get("step", 0) >= 1, 300, "run-b's first step")
        assert api(port, "/api/jobs/2/live")["progress"]["step"] < 100
        server.kill()
        server.wait()
        wait_for(lambda: (tmp_path / "out_b" / "training_config.yaml").is_file(), 300, "run-b to finish without a UI")

        port = free_port()
        server = start_server(tmp_path, state, port, log=tmp_path / "ui.log")
        base = f"http://127.0.0.1:{port}/"
        tabs = [new_page(browser) for _ in range(2)]  # two browser contexts: no shared storage
        tabs[0].goto(base + "#/job/2")
        tabs[0].wait_for_selector("#job-status[data-status=done]")
        wait_for(lambda: chart_points(tabs[0]) == 100, 30, "run-b's whole loss curve after the restart")
        tabs[0].wait_for_selector("#files li[data-file='adapter_model.safetensors'] a")
        shot(tabs[0], "6_after_restart_job")
        tabs[1].goto(base + "#/jobs")
        for tab in tabs:
            tab.goto(base + "#/jobs")
            tab.wait_for_selector("#jobs tr[data-job-id='2'][data-status=done]")
            assert tab.get_attribute("#jobs tr[data-job-id='1']", "data-status") == "done"
        shot(tabs[1], "7_jobs_second_context")

        compare = tabs[1]
        compare.goto(base + "#/compare")
        compare.check(".pick[value='1']")
        compare.check(".pick[value='2']")
        compare.click("#compare-go")
        compare.wait_for_selector("#diff")
        assert chart_points(compare, "#compare-chart") == 150 + 5 + 100
        diff = compare.inner_text("#diff")
        assert "max_steps" in diff and "output_dir" in diff and "lora_rank" not in diff
        assert compare.locator("#compare-files li[data-file='adapter_model.safetensors']").count() == 2
        shot(compare, "8_compare")

        # data page: import an image config, run the doctor, fix a caption
        data = tmp_path / "style"
        for i in range(3):
            save_image(data / f"img{i}.png", (96, 96), seed=i)
        (data / "img3.png").write_bytes((data / "img0.png").read_bytes())
        (data / "metadata.csv").write_text("filename,prompt\nimg0.png,a cat\nimg1.png,a dog\nimg2.png,a cow\nimg3.png,a cat\n", encoding="utf-8")
        config = tmp_path / "image.yaml"
        config.write_text(yaml.safe_dump({"task_type": "image", "base_model": "models/sd15.safetensors", "train_data_dir": "style",
                                          "output_dir": "out_img"}), encoding="utf-8")
        compare.goto(base + "#/config")
        compare.set_input_files("#import-file", str(config))
        compare.wait_for_function("document.querySelector('[name=train_data_dir]')?.value === 'style'")
        compare.click("#nav-data")
        compare.click("#run-doctor")
        compare.wait_for_selector(".finding[data-check=exact_duplicate] figure[data-item='img3.png'] img")
        compare.click("#load-captions")
        row = compare.locator("#captions tr[data-rel='img1.png']")
        row.locator("input").fill("a dog, running")
        row.locator(".save-caption").click()
        row.get_by_text("saved").wait_for()
        assert (data / "metadata.csv").read_text(encoding="utf-8").splitlines()[2] == 'img1.png,"a dog, running"'
        shot(compare, "9_data_doctor_captions")
    except Exception:
        for number, open_page in enumerate(p for context in browser.contexts for p in context.pages):
            shot(open_page, f"failure_{number}")
        raise
    finally:
        server.kill()
        server.wait()
