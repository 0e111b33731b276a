"""The server's web page (web/, web_page.py) in a real browser: Playwright drives headless Chromium from the system
packages against a real uvicorn server on 127.0.0.1 (tiny model, batching engine, paced like a slower model)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

import audio_formats
import serve_npu
import speech_api
import web_page
from audio_io import load_prompt_audio
from serve_assets import GREEDY_DEFAULTS, running_server, tiny_engine, tiny_state, write_voices
from serve_assets import tiny, voices_dir  # noqa: F401 (fixtures)

FRAMES = 10  # served default max_new_frames of these tests: 0.8 s of audio
SAMPLES_PER_FRAME = 3840
PACE = 0.12  # seconds between the engine's audio events, so a response lasts long enough to hear it stream
FLAGS = ("--do-sample", "false", "--max-new-frames", str(FRAMES))
CHROMIUM_ARGS = ["--no-sandbox",  # why: Chromium refuses to run as root (CI containers) with its sandbox
                 "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # a microphone that beeps


def chromium_path() -> str | None:
    candidates = [os.environ.get("MOSS_TTS_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return next((path for path in candidates if path), None)


class PacedHandle:
    """An engine request handle whose audio events arrive ``pause`` seconds apart (the tiny model is too fast to
    tell streaming from sending at the end); everything else is the real handle's."""

    def __init__(self, handle, pause: float) -> None:
        self._handle, self._pause = handle, pause

    def events(self, *args, **kwargs):
        for event in self._handle.events(*args, **kwargs):
            if event["type"] != "result":
                time.sleep(self._pause)
            yield event

    def __getattr__(self, name):
        return getattr(self._handle, name)


class PacedEngine:
    """The real engine; its submit paces the events and records the keyword arguments each request reached it with."""

    def __init__(self, engine, pause: float) -> None:
        self._engine, self._pause, self.calls = engine, pause, []

    def submit(self, text, **kwargs):
        self.calls.append({"text": text, **kwargs})
        return PacedHandle(self._engine.submit(text, **kwargs), self._pause)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def engine(tiny):
    return PacedEngine(tiny_engine(tiny), PACE)


def serve(tiny, engine, voices_dir, *flags: str):
    """A running server built by serve_npu.build_app from serve_npu's own flags (stopping it stops ``engine``)."""
    args = serve_npu.build_parser().parse_args(["--demo", *FLAGS, *flags])
    state = tiny_state(tiny, engine, speech_api.load_voices(voices_dir, tiny.codec), flags=FLAGS)
    return running_server(state, app=serve_npu.build_app(args, state))


@pytest.fixture(scope="module")
def server(tiny, engine, voices_dir):
    with serve(tiny, engine, voices_dir) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install -r requirements-dev.txt)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium (.ci/run does so as root), or set MOSS_TTS_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """Open a server's page, ready (voices loaded); script errors fail the test."""
    contexts, errors = [], []

    def opener(url: str, ready: bool = True):
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))  # (failed API calls log console errors)
        page.goto(url + "/")
        if ready:
            page.wait_for_selector('[data-testid=status][data-state=ready]', timeout=20_000)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert errors == []


def status(page) -> dict:
    return page.eval_on_selector("[data-testid=status]", "e => ({text: e.textContent, ...e.dataset})")


def speak(page, state: str = "done") -> dict:
    page.get_by_test_id("speak").click()
    page.wait_for_selector(f"[data-testid=status][data-state={state}]", timeout=60_000)
    return status(page)


def audio_duration(page) -> float:
    return page.eval_on_selector("[data-testid=audio]", """a => new Promise(done => a.readyState >= 1
        ? done(a.duration) : a.addEventListener('loadedmetadata', () => done(a.duration), {once: true}))""")


# ---------------------------------------------------------------------------------------------------- tests


def test_the_page_is_served_and_no_web_turns_it_off(tiny, voices_dir, server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for testid in ("text", "voice", "reference", "speak", "status", "audio"):
        assert f'data-testid="{testid}"' in page.text
    assert httpx.get(server.url + "/web/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/web/config.json").json()["demo"] is True
    assert "/" not in httpx.get(server.url + "/openapi.json").json()["paths"]  # the API's schema stays the API's
    with serve(tiny, None, voices_dir, "--no-web") as bare:  # no engine: the API still answers GET requests
        for route in ("/", "/web/app.js", "/web/config.json"):
            response = httpx.get(bare.url + route)
            assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
        assert httpx.get(bare.url + "/v1/audio/voices").status_code == 200


def test_a_copy_without_the_page_files_fails_at_startup_with_the_remedy(tmp_path):
    from fastapi import FastAPI

    with pytest.raises(RuntimeError, match=r"web page file .*index.html is missing; .* or pass --no-web"):
        web_page.add_web_page(FastAPI(), demo=False, defaults={}, directory=tmp_path)


def test_speaking_streams_audio_that_plays_before_the_response_ends(server, open_page):
    page = open_page(server.url)
    assert page.get_by_test_id("demo-note").is_visible()  # --demo: the page says the voice is noise
    page.get_by_test_id("text").fill("A sentence typed into the page.")
    with page.expect_request("**/v1/audio/speech") as sent:
        result = speak(page)
    request = sent.value
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.post_data)
    assert body == {"input": "A sentence typed into the page.", "response_format": "pcm", "voice": "default",
                    "stream": True}
    seconds = FRAMES * SAMPLES_PER_FRAME / 48000
    first, playing, ended = (float(result[k]) for k in ("firstAudioMs", "playbackStartMs", "responseEndMs"))
    assert 0 < first <= playing < ended  # the first audio played while the rest was still being generated
    assert float(result["audioSeconds"]) == pytest.approx(seconds, abs=1e-3)
    assert float(result["rtf"]) == pytest.approx(ended / 1000 / seconds, rel=1e-2)
    assert audio_duration(page) == pytest.approx(seconds, abs=1e-3)  # the finished result, as a WAV
    download = page.get_by_test_id("download")
    assert download.get_attribute("download") == "speech.wav" and download.get_attribute("href").startswith("blob:")
    assert page.get_by_test_id("rtf").text_content() != "–"


def test_an_empty_text_shows_the_servers_message_next_to_the_text(server, open_page):
    expected = httpx.post(server.url + "/v1/audio/speech", json={"input": ""}).json()["error"]
    assert expected["param"] == "input"
    page = open_page(server.url)
    page.get_by_test_id("text").fill("")
    result = speak(page, state="error")
    assert result["text"] == expected["message"] and result["errorParam"] == "input"
    assert page.locator('[data-error-for="input"]').text_content() == expected["message"]
    assert page.get_by_test_id("text").get_attribute("aria-invalid") == "true"


def test_a_sampling_error_is_shown_at_its_field(server, open_page):
    page = open_page(server.url)
    page.locator("summary").click()
    page.locator("#text_top_p").fill("1.5")
    result = speak(page, state="error")
    assert result["errorParam"] == "text_top_p" and "text_top_p" in result["text"]
    assert page.locator('[data-error-for="text_top_p"]').text_content() == result["text"]
    page.locator("#text_top_p").fill("")  # the next request goes through and clears the error
    assert speak(page)["state"] == "done"
    assert page.locator('[data-error-for="text_top_p"]').text_content() == ""


def test_the_voice_list_is_the_servers(server, open_page, engine):
    served = [v["name"] for v in httpx.get(server.url + "/v1/audio/voices").json()["voices"]]
    assert served == ["default", "alice", "bob"]
    page = open_page(server.url)
    voice = page.get_by_test_id("voice")
    assert voice.locator("option").evaluate_all("options => options.map(o => o.value)") == served
    voice.select_option("bob")
    speak(page)
    assert engine.calls[-1]["prompt_audio_codes"] is server.state.voices["bob"].codes


def test_a_reference_file_upload_reaches_the_server(server, open_page, engine, voices_dir):
    page = open_page(server.url)
    with page.expect_request("**/v1/audio/speech") as sent:
        page.get_by_test_id("reference").set_input_files(str(voices_dir / "alice.wav"))
        page.wait_for_selector("[data-testid=reference-info]:has-text('alice.wav')")
        speak(page)
    body = json.loads(sent.value.post_data)
    assert "voice" not in body
    header, _, payload = body["ref_audio"].partition(",")
    assert header == "data:audio/wav;base64" and base64.b64decode(payload) == (voices_dir / "alice.wav").read_bytes()
    call = engine.calls[-1]
    assert call["mode"] == "voice_clone" and "prompt_audio_codes" not in call
    # the reference's preview outlives the result's URLs (replaced at each request)
    assert page.eval_on_selector("#reference-preview", """a => new Promise(done => {
        const probe = new Audio();
        probe.onloadedmetadata = () => done(true);
        probe.onerror = () => done(false);
        probe.src = a.src;
    })""")
    assert torch.equal(call["prompt_audio"], load_prompt_audio(voices_dir / "alice.wav"))


def test_a_microphone_recording_is_sent_as_a_wav_reference(server, open_page, engine):
    page = open_page(server.url)
    record = page.get_by_test_id("record")
    record.click()
    page.wait_for_selector("[data-testid=record][data-recording=true]")
    page.wait_for_timeout(700)
    record.click()
    page.wait_for_selector("[data-testid=reference-info]:has-text('recording')")
    with page.expect_request("**/v1/audio/speech") as sent:
        speak(page)
    assert json.loads(sent.value.post_data)["ref_audio"].startswith("data:audio/wav;base64,")
    prompt = engine.calls[-1]["prompt_audio"]
    assert prompt.shape[0] == 2 and prompt.shape[1] > 0.3 * 48000 and prompt.abs().max() > 0.01  # the fake beep


def test_the_page_follows_the_servers_schema_and_asks_for_its_key(tiny, voices_dir, open_page):
    """A server started with --api-key keeps its schema and voices behind the key but serves the page: the page
    asks for the key, then finds the formats and the speed range in the server's own /openapi.json."""
    args = serve_npu.build_parser().parse_args(["--demo", *FLAGS, "--api-key", "sesame"])
    engine = PacedEngine(tiny_engine(tiny), PACE)  # its own: stopping this server stops its engine
    state = tiny_state(tiny, engine, speech_api.load_voices(voices_dir, tiny.codec), flags=FLAGS)
    app = serve_npu.build_app(args, state)
    with running_server(state, app=app) as hardened:
        page = open_page(hardened.url, ready=False)
        page.wait_for_selector("[data-testid=status][data-state=error]")
        assert page.get_by_test_id("key").is_visible() and not page.get_by_test_id("speed").is_visible()
        assert page.locator('[data-error-for="api_key"]').text_content().startswith("Incorrect API key provided")
        page.get_by_test_id("key").fill("sesame")
        page.get_by_test_id("key").dispatch_event("change")
        page.wait_for_selector("[data-testid=status][data-state=ready]")
        formats = page.get_by_test_id("format").locator("option").evaluate_all("o => o.map(x => x.value)")
        assert formats and sorted(formats) == sorted(audio_formats.RESPONSE_FORMATS)
        speed = page.get_by_test_id("speed")
        assert speed.is_visible() and (speed.get_attribute("min"), speed.get_attribute("max")) == ("0.25", "4")
        with page.expect_request("**/v1/audio/speech") as sent:
            result = speak(page)
        assert sent.value.headers["authorization"] == "Bearer sesame"
        body = json.loads(sent.value.post_data)
        assert (body["input"], body["response_format"], body["voice"]) == (
            page.get_by_test_id("text").input_value(), "pcm", "default")
        assert float(result["audioSeconds"]) == pytest.approx(FRAMES * SAMPLES_PER_FRAME / 48000, abs=1e-3)


def test_stop_ends_the_request_and_frees_its_slot(server, open_page):
    page = open_page(server.url)
    page.locator("summary").click()
    page.locator("#max_new_frames").fill("1500")
    page.get_by_test_id("speak").click()
    page.wait_for_selector("[data-testid=status][data-first-audio-ms]")
    assert httpx.get(server.url + "/health").json()["active"] == 1
    page.get_by_test_id("stop").click()
    page.wait_for_selector("[data-testid=status][data-state=error]:has-text('Stopped.')")
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["active"] != 0:  # the server cancelled it on the disconnect
        assert time.monotonic() < deadline, "the stopped request still holds its slot"
        time.sleep(0.05)
    assert page.get_by_test_id("speak").is_enabled() and not page.get_by_test_id("stop").is_enabled()


def test_the_player_joins_samples_split_across_network_chunks(server, open_page):
    """Stream chunks may end mid-sample or mid-frame: the player carries the rest to the next chunk."""
    page = open_page(server.url)
    played = page.evaluate("""() => {
        const frames = 37, channels = 2, bytes = new Uint8Array(frames * channels * 2);
        const view = new DataView(bytes.buffer);
        for (let i = 0; i < frames * channels; i++) view.setInt16(2 * i, (i * 977) % 65536 - 32768, true);
        const player = new PcmPlayer();
        for (let start = 0, size = 1; start < bytes.length; start += size, size = size % 7 + 2) {
            player.push(bytes.slice(start, start + size), 24000, channels, () => {});
        }
        const out = [[], []];
        for (const source of player.sources) {
            for (let c = 0; c < channels; c++) out[c].push(...source.buffer.getChannelData(c));
        }
        player.stop();
        return out.map(channel => channel.map(x => Math.round(x * 32768)));
    }""")
    samples = [(i * 977) % 65536 - 32768 for i in range(37 * 2)]
    assert played == [samples[0::2], samples[1::2]]


def test_a_format_that_cannot_stream_plays_once_complete(server, open_page):
    page = open_page(server.url)
    page.get_by_test_id("format").select_option("flac")
    with page.expect_request("**/v1/audio/speech") as sent:
        result = speak(page)
    assert json.loads(sent.value.post_data)["response_format"] == "flac"
    assert "stream" not in json.loads(sent.value.post_data)  # the server's default: FLAC's header needs the length
    assert "playbackStartMs" not in result and float(result["firstAudioMs"]) > 0
    assert audio_duration(page) == pytest.approx(FRAMES * SAMPLES_PER_FRAME / 48000, abs=1e-3)
    assert float(result["audioSeconds"]) == pytest.approx(FRAMES * SAMPLES_PER_FRAME / 48000, abs=1e-3)
    assert page.get_by_test_id("download").get_attribute("download") == "speech.flac"
