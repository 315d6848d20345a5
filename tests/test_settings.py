"""Settings precedence (flags > environment > preset file > defaults), presets, CLI flags, OpenAPI."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import _parser, main
from server.settings import CONFIG_DIR, Settings, load_settings


def test_flags_beat_env_beat_file_beat_defaults(monkeypatch, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("max_queue: 11\nmax_batch_images: 12\nmax_running_seqs: 13\n")
    monkeypatch.setenv("BLIPSERVE_MAX_BATCH_IMAGES", "22")
    monkeypatch.setenv("BLIPSERVE_MAX_RUNNING_SEQS", "23")
    s = load_settings(str(preset), max_running_seqs=33, port=None)
    assert (s.max_queue, s.max_batch_images, s.max_running_seqs) == (11, 22, 33)
    assert s.port == Settings.model_fields["port"].default


def test_every_preset_loads():
    for path in CONFIG_DIR.glob("*.yaml"):
        s = load_settings(path.stem)
        assert s.model and (s.vqa_template is None or "{question}" in s.vqa_template)


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="presets"):
        load_settings("no-such-preset")
    with pytest.raises(ValueError, match="max_queue"):
        load_settings(None, max_queue=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_a_setting: 1\n")
    with pytest.raises(ValueError, match="not_a_setting"):
        load_settings(str(bad))


def test_openapi_documents_both_body_types():
    schema = TestClient(create_app(Settings())).get("/openapi.json").json()
    for path, model in (("/caption", "CaptionRequest"), ("/vqa", "VQARequest")):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"].endswith(model)
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"
        assert model in schema["components"]["schemas"]


def test_revision_reaches_the_hub_and_the_served_name_the_engine(monkeypatch, checkpoints):
    import huggingface_hub

    from batching.engine_process import load_engine
    from server.startup import check

    root = checkpoints("pre_ln")[0]
    calls = []

    def snapshot_download(repo_id: str, revision: str | None = None, allow_patterns=None) -> str:
        calls.append((repo_id, revision))
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    settings = load_settings(
        None, model="org/blip", revision="0123abc", device="cpu", served_model_name=["b"]
    )
    assert check(settings) == root and calls == [("org/blip", "0123abc")]
    engine = load_engine(settings)  # the thread engine resolves it again, at the same revision
    assert calls == [("org/blip", "0123abc")] * 2 and engine.model_id == "b"
    assert load_settings(None, model="org/blip").model_name == "org/blip"


def test_cuda_graphs_help_says_what_it_does_and_its_default():
    help_text = " ".join(_parser().format_help().split())
    entry = help_text.split("--cuda-graphs, --no-cuda-graphs", 1)[1].split(" --decode-kv-step", 1)[0]
    assert "prefills and vision batches as CUDA graphs" in entry and "(default: true)" in entry


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--log-level", "verbose"], "argument --log-level: invalid choice: 'verbose'"),
        (["--root-path", "blip"], "--root-path blip: expected a path that starts with '/'"),
        (["--access-log-exclude", "/health,ready"], "--access-log-exclude /health,ready: 'ready': expected"),
        (["--vqa-template", "Q: A:"], "--vqa-template Q: A:: expected {question} where the question goes"),
        (["--vqa-template", "{question} {x}"], "and no other field ({x})"),
        (["--vqa-template", "{question} {"], "not a template (Single '{' encountered in format string)"),
        (
            ["--default-max-new-tokens", "500"],
            "--default-max-new-tokens 500: more than --max-new-tokens-limit",
        ),
        (["--max-new-tokens-limit", "9", "--vqa-max-new-tokens", "10"], "--vqa-max-new-tokens 10: more than"),
        (["--default-num-beams", "9"], "--default-num-beams 9: more than --max-beams (8)"),
        (["--max-wait-ms", "nan"], "--max-wait-ms nan: Input should be a finite number"),
        (["--request-timeout-s", "inf"], "--request-timeout-s inf: Input should be a finite number"),
    ],
)
def test_settings_that_would_fail_at_the_first_request_stop_the_start(capsys, flags, line):
    """Each was accepted, then failed at run time: a template with another field was a 500 on every
    /vqa, one without {question} dropped the question, a default above its limit made each request
    that left the field out a 422 naming a field it never sent, --log-level verbose a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and line in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 2, err


def test_log_level_is_read_in_any_case_and_the_root_path_without_its_trailing_slash(monkeypatch):
    monkeypatch.setenv("BLIPSERVE_LOG_LEVEL", "WARNING")
    assert load_settings(None, root_path="/blip/").log_level == "warning"
    assert load_settings(None, root_path="/blip/").root_path == "/blip"
    assert load_settings(None, vqa_template="{question}").vqa_template == "{question}"
    assert (
        load_settings(None, max_new_tokens_limit=20).default_max_new_tokens == 20
    )  # its default, 30, lowered
