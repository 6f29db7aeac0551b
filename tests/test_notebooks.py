"""The real notebooks under papermill: train.ipynb on a micro config, its failure on a bad name,
nbconvert to offline HTML, and a sweep (one run failing) that renders summary.ipynb."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from papermill.exceptions import PapermillExecutionError
from runs import cli, micro, set_args
from workbook import ensure_python3_kernel, execute, outputs, text_of

from gptlib import launch, paths, report
from gptlib.config import PARAMETERS_DIR
from gptlib.paths import OUTPUTS_DIR, SUMMARY_NOTEBOOK, TRAIN_NOTEBOOK

PLOTLY_MIME = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(outputs folder, a working directory that is not the repository root)."""
    ensure_python3_kernel()
    base = tmp_path_factory.mktemp("workbook")
    (base / "elsewhere").mkdir()
    return base / "outputs", base / "elsewhere"


@pytest.fixture(scope="module")
def baseline(dataset: Path, places: tuple[Path, Path]) -> tuple[Path, dict]:
    """train.ipynb rendered for a micro baseline from another directory: (run dir, notebook)."""
    out, elsewhere = places
    run_dir = out / "tiny" / "baseline"
    nb = execute(TRAIN_NOTEBOOK, run_dir / "train.ipynb",
                 {"overrides": micro(dataset), "run_dir": str(run_dir)}, cwd=elsewhere)
    return run_dir, nb


def test_source_notebooks_are_committed_clean() -> None:
    for path in (TRAIN_NOTEBOOK, SUMMARY_NOTEBOOK):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), path
        assert code[0]["metadata"]["tags"] == ["parameters"], path
    first = "".join(json.loads(TRAIN_NOTEBOOK.read_text())["cells"][1]["source"])
    for default in ('intervention = "baseline"', 'scale = "tiny"', "seed = 42", 'nproc = "auto"',
                    "overrides = {}"):
        assert default in first


def test_train_notebook_renders_the_report(baseline: tuple[Path, dict]) -> None:
    run_dir, nb = baseline
    assert not nb["metadata"]["papermill"]["exception"]
    outs = outputs(nb)
    assert not [o for o in outs if o["output_type"] == "error"]
    assert any("window.Plotly = Plotly" in text_of(o, "text/html") for o in outs)  # plotly.js inline
    figures = [o for o in outs if PLOTLY_MIME in o.get("data", {})]
    assert len(figures) == 3
    assert all('class="plotly-graph-div"' in text_of(o, "text/html") for o in figures)
    assert all("<script src=" not in text_of(o, "text/html") for o in figures)

    summary = json.loads((run_dir / "summary.json").read_text())
    texts = [text_of(o) for o in outs]
    shown = "\n".join(texts)
    assert summary["status"] == "completed"
    assert f"Test loss: {summary['test_loss']:.4f} (checkpoint {summary['eval_checkpoint']})" in shown
    assert f"Smoke test: {summary['smoke_text']}" in shown
    assert "This is a baseline run of scale tiny: one sample of the baseline's seed noise" in shown
    progress = next(t for t in texts if "Training complete in" in t)
    assert "100%  step 8/8" in progress and "checkpoint step-8" in progress
    assert f"Final train loss: {summary['final_train_loss']:.3f}" in shown
    assert "Changes from the tiny baseline:\n  model.vocab_size: 1024 -> 50257" in shown
    assert f"The whole configuration: {run_dir / 'config.yaml'}." in shown
    assert not [o for o in outs if o.get("name") == "stderr"]  # no red boxes
    for name in ("config.yaml", "metrics.jsonl", "charts/loss.html", "charts/plotly.min.js"):
        assert (run_dir / name).exists(), name


def test_bad_intervention_fails_first_with_one_line(places: tuple[Path, Path],
                                                    dataset: Path) -> None:
    out, elsewhere = places
    output = out / "bad.ipynb"
    with pytest.raises(PapermillExecutionError) as caught:
        execute(TRAIN_NOTEBOOK, output, {"intervention": "no-dropuot", "overrides": micro(dataset)},
                cwd=elsewhere)
    assert caught.value.ename == "ConfigError"
    assert caught.value.evalue.startswith("unknown intervention 'no-dropuot'; allowed: no-dropout, ")
    nb = json.loads(output.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    failed = code[2]  # parameters, injected parameters, then validation
    errors = [o for o in failed["outputs"] if o["output_type"] == "error"]
    assert errors and errors[0]["traceback"] == [f"ConfigError: {caught.value.evalue}"]
    assert "gradient-clipping" in errors[0]["evalue"]  # the valid names are listed
    assert all(c["execution_count"] is None for c in code[3:])
    assert not (out / "tiny" / "no-dropuot").exists()


@pytest.mark.parametrize(("parameters", "expected"), [
    ({"run_dir": 5}, "run_dir=5: expected a folder path as text (papermill: pass it with -r "
                     "run_dir ... to keep it a string)"),
    ({"resume": True}, "resume=True: allowed: latest, best, step-N, or None to start afresh"),
])
def test_a_parameter_of_the_wrong_type_fails_with_one_line(places: tuple[Path, Path], dataset: Path,
                                                           parameters: dict, expected: str) -> None:
    out, elsewhere = places
    with pytest.raises(PapermillExecutionError) as caught:
        execute(TRAIN_NOTEBOOK, out / "typed.ipynb", {"overrides": micro(dataset), **parameters},
                cwd=elsewhere)
    assert (caught.value.ename, caught.value.evalue) == ("ConfigError", expected)
    failed = json.loads((out / "typed.ipynb").read_text())["cells"]
    errors = [o for c in failed if c["cell_type"] == "code" for o in c["outputs"]
              if o["output_type"] == "error"]
    assert [e["traceback"] for e in errors] == [[f"ConfigError: {expected}"]]


def test_default_run_dir_is_under_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 dataset: Path) -> None:
    assert OUTPUTS_DIR == Path(report.__file__).resolve().parent.parent / "outputs"
    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    _, run_dir, _ = launch.prepare_run(overrides=micro(dataset), intervention="qkv-bias")
    assert run_dir == tmp_path / "outputs" / "tiny" / "qkv-bias"


def _jupyter() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jupyter"]


def test_nbconvert_html_works_offline(baseline: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = baseline
    result = subprocess.run([*_jupyter(), "nbconvert", "--to", "html", str(run_dir / "train.ipynb"),
                             "--output-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "train.html").read_text()
    library = page.find("window.Plotly = Plotly")
    assert library != -1, "plotly.js must be inline"
    assert page.count("Plotly.newPlot(") == 3 and library < page.find("Plotly.newPlot(")
    assert page.count('class="plotly-graph-div"') == 3
    sources = re.findall(r'<script[^>]* src="([^"]*)"', page)
    assert not [s for s in sources if "plot" in s.lower()], sources
    smoke = json.loads((run_dir / "summary.json").read_text())["smoke_text"]
    assert smoke.split()[4] in page


def test_sweep_reports_a_failed_run_and_still_renders_the_summary(
        baseline: tuple[Path, dict], places: tuple[Path, Path], dataset: Path,
        tmp_path: Path) -> None:
    out, elsewhere = places
    parameters = tmp_path / "parameters"
    shutil.copytree(PARAMETERS_DIR, parameters)
    (parameters / "interventions" / "explode.yaml").write_text(
        "train:\n  learning_rate: 1.0e+30  # diverges at once\n  max_nonfinite_steps: 1\n")
    env = {**os.environ, "GPTLIB_PARAMETERS": str(parameters)}
    result = cli("sweep", "--scale", "tiny", "--interventions", "baseline,no-dropout,explode",
                 "--outputs", out, *set_args(micro(dataset)), timeout=600, cwd=elsewhere, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[1/3] baseline: completed earlier, skipped" in result.stdout
    assert "  no-dropout | step 8/8" in result.stdout  # the run's log, streamed
    assert "sweep done: 1 trained, 1 skipped, 1 failed" in result.stderr
    assert re.search(r"FAILED explode: LaunchError: training failed on rank 0 .*non-finite",
                     result.stderr)
    assert json.loads((out / "tiny" / "explode" / "summary.json").read_text())["status"] == "failed"
    assert (out / "tiny" / "explode" / "train.ipynb").exists()

    nb = json.loads((out / "tiny" / "summary.ipynb").read_text())
    assert not nb["metadata"]["papermill"]["exception"]
    table = next(text_of(o, "text/html") for o in outputs(nb)
                 if "Δ vs baseline" in text_of(o, "text/html"))
    rows = dict(re.findall(r"<tr>\s*<th>([^<]+)</th>\s*<td>([^<]+)</td>", table))
    assert rows == {"baseline": "completed", "no-dropout": "completed", "explode": "failed"}
    figures = [o for o in outputs(nb) if PLOTLY_MIME in o.get("data", {})]
    assert len(figures) >= 2  # test-loss bars, loss curves (and a loss chart per run with a spike)


def test_sweep_checks_every_run_before_starting(tmp_path: Path) -> None:
    from gptlib.presets import list_interventions
    from gptlib.sweep import parse_interventions, plan

    names = parse_interventions("all")
    assert names[0] == "baseline" and sorted(names) == list_interventions()
    runs = plan("tiny", "baseline,qkv-bias+no-dropout,baseline", seeds=[42, 43], outputs=tmp_path)
    assert [r.name for r in runs] == ["baseline", "qkv-bias+no-dropout", "baseline-seed43",
                                      "qkv-bias+no-dropout-seed43"]
    assert runs[1].run_dir == tmp_path / "tiny" / "qkv-bias+no-dropout"
    result = cli("sweep", "--interventions", "baseline,no-dropuot", "--outputs", tmp_path / "out",
                 timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown intervention 'no-dropuot'; allowed: no-dropout")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- what the reader sees


@pytest.fixture(scope="module")
def compared(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Micro runs with every verdict there is -- baseline x3, qkv-bias x2, weight-tying x1 --,
    summary.ipynb rendered over them and converted to HTML: (outputs folder, summary.html)."""
    from workbook import train_in_process

    from gptlib.evals import evaluate_run

    ensure_python3_kernel()
    out = tmp_path_factory.mktemp("compared") / "outputs"
    runs = (("baseline", (42, 43, 44)), ("qkv-bias", (42, 43)), ("weight-tying", (42,)))
    for intervention, seeds in runs:
        for seed in seeds:
            name = intervention + ("" if seed == 42 else f"-seed{seed}")
            run = train_in_process(out / "tiny" / name, micro(dataset, **{"train.random_seed": seed}),
                                   intervention)
            evaluate_run(run)
    nb = out / "tiny" / "summary.ipynb"
    execute(SUMMARY_NOTEBOOK, nb, {"outputs_dir": str(out)}, cwd=out)
    result = subprocess.run([*_jupyter(), "nbconvert", "--to", "html", str(nb)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out, out / "tiny" / "summary.html"


def test_summary_page_shows_the_computed_verdicts_and_the_chart_data(
        compared: tuple[Path, Path]) -> None:
    from gptlib import summary

    out, page = compared
    html = page.read_text()
    noise = summary.noise_table(summary.collect_runs(out, "tiny")).set_index("intervention")
    assert noise.loc["weight-tying", "verdict"] == "unknown: needs seeds"
    assert noise.loc["qkv-bias", "verdict"] in ("better", "worse", "within noise")
    view = summary.noise_view(noise.reset_index())
    for name in ("qkv-bias", "weight-tying"):  # the noise table's row, as computed
        noise_html = html.split("95% interval", 1)[1]
        row = re.search(rf"<th>{re.escape(name)}</th>(.*?)</tr>", noise_html, re.S)
        cells = re.findall(r"<td>([^<]*)</td>", row.group(1))
        assert cells[:7] == [str(v) for v in view.loc[name].tolist()[:7]], (name, cells)
    # The bar chart's data (the notebook's Plotly JSON, and the same traces in the page's script):
    # one bar trace per verdict, named by it, holding that intervention.
    nb = json.loads((out / "tiny" / "summary.ipynb").read_text())
    chart = next(o["data"][PLOTLY_MIME] for o in outputs(nb) if PLOTLY_MIME in o.get("data", {}))
    bars = {t["name"]: list(t["x"]) for t in chart["data"] if t.get("type") == "bar"}
    assert bars[noise.loc["qkv-bias", "verdict"]] == ["qkv-bias"]
    assert bars["unknown: needs seeds"] == ["weight-tying"]
    script = html[html.index("Plotly.newPlot("):]
    for name in bars:
        assert re.search(r'"name":\s*' + re.escape(json.dumps(name)), script), name
    assert "baseline: 3 evaluated seeds, mean " in html
    assert "No run of this table recorded a loss spike" in html or "spikes (" in html


def test_summary_page_in_a_real_browser(compared: tuple[Path, Path], tmp_path: Path) -> None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                   None)
    if browser is None:
        pytest.skip("no headless Chromium on this machine")
    _, page = compared
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=8000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="main-svg"') >= 2  # plotly drew the charts (offline: inline js)
    assert "unknown: needs seeds" in dom.stdout
