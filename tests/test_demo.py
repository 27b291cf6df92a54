"""The Gradio chat demo (tools/app.py) used as a person uses it, in headless Chromium, and as an
API client would abuse it: slow and idle clients, bad values, non-image uploads, huge lengths."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, child_environment, free_port
from tests.hf_fixtures import converted_tiny_eve


@pytest.fixture(scope="module")
def demo(tmp_path_factory, corpus):
    """The demo serving a converted tiny checkpoint on a loopback port, and a gradio_client on it."""
    from gradio_client import Client

    model = converted_tiny_eve(tmp_path_factory.mktemp("demo"), corpus["tokenizer"])
    port = free_port()
    env = {**child_environment(), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "app.py"), "--load", model["load"],
                             "--tokenizer-model", model["tokenizer"], "--port", str(port), "--max-new-tokens", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    address = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.5)
    client = None
    while client is None and time.time() < deadline:
        try:
            client = Client(address + "/", verbose=False)
        except Exception:  # noqa: BLE001 — the app is still starting
            time.sleep(0.5)
    assert client is not None, "the demo did not start"
    yield {**model, "address": address, "client": client, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


def ask(demo, text, files=(), max_new_tokens=6, temperature=0.0, top_p=1.0):
    """One question in a new session (a client's session keeps its chat history)."""
    from gradio_client import Client, handle_file

    message = {"text": text, "files": [handle_file(f) for f in files]}
    client = Client(demo["address"] + "/", verbose=False)
    return client.predict(message, max_new_tokens, temperature, top_p, api_name="/chat")


def test_streams_an_answer_about_an_image(demo):
    from gradio_client import handle_file

    job = demo["client"].submit({"text": "What is in the picture?", "files": [handle_file(demo["images"][0])]},
                                6, 0.0, 1.0, api_name="/chat")
    final = job.result(timeout=120)
    steps = job.outputs()
    assert final and not final.startswith("⚠")
    assert len(steps) > 1 and all(final.startswith(step) for step in steps)  # streamed, piece by piece


@pytest.mark.parametrize("values, message", [
    ((6, "nan", 1.0), "temperature must be a finite number, not 'nan'"),
    ((6, 0.0, 0), "top_p must be in (0, 1], not 0.0"),
    (("many", 0.0, 1.0), "max_new_tokens must be a number, not 'many'"),
    ((100000, 0.0, 1.0), "max_new_tokens must be between 1 and 2048, not 100000"),
    ((-3, 0.0, 1.0), "max_new_tokens must be between 1 and 2048, not -3"),
])
def test_bad_values_get_a_message_in_the_chat(demo, values, message):
    assert ask(demo, "Hello?", (), *values) == f"⚠ {message}"


def test_a_tiny_temperature_is_answered_as_greedy(demo):
    """A temperature of 1e-40 overflowed the logits: "the model failed on this request"."""
    greedy = ask(demo, "What is in the picture?", [demo["images"][0]])
    assert ask(demo, "What is in the picture?", [demo["images"][0]], 6, 1e-40) == greedy
    assert not greedy.startswith("⚠")
    assert ask(demo, "Hello?", (), 6, "inf") == "⚠ temperature must be a finite number, not 'inf'"


def test_a_non_image_upload_gets_a_message_without_server_paths(demo, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"this is not an image")
    answer = ask(demo, "What is this?", [str(fake)])
    assert answer.startswith("⚠ image holiday.png cannot be read")
    assert "/tmp" not in answer and "gradio" not in answer.lower() and str(tmp_path) not in answer


def test_streaming_keeps_the_length_limit_of_answer(demo):
    """A prompt that leaves the model no position to answer in: the same refusal as answer() (one
    that leaves fewer than the slider's new tokens is answered, cut where the positions end)."""
    answer = ask(demo, "word " * 3000, (), 6)
    assert re.fullmatch(r"⚠ the prompt takes \d+ positions; the model allows 2048", answer)


def test_slow_and_idle_clients_do_not_block_others(demo):
    port = int(demo["address"].rsplit(":", 1)[1])
    stalled = []
    for request in (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers never finished
                    b"POST /gradio_api/queue/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                    b"Content-Type: application/json\r\n\r\n{\"data\": [",  # a body that never comes
                    b"POST /gradio_api/queue/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n"):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request)
        stalled.append(sock)
    try:
        started = time.time()
        answer = ask(demo, "Are you there?")
        assert answer and not answer.startswith("⚠") and time.time() - started < 60
    finally:
        for sock in stalled:
            sock.close()


def test_a_person_chats_in_headless_chromium(demo):
    """Open the page, attach an image, type a question, press Enter: the streamed answer appears in
    the chat, the same as an API client gets for the same question."""
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"):
        options.add_argument(flag)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:
        options.binary_location = browser
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(demo["address"] + "/")
        wait = WebDriverWait(driver, 90)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))[0]
        upload.send_keys(demo["images"][1])
        box = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "textarea"))[0]
        box.send_keys("What shape is it?")
        box.send_keys(Keys.ENTER)

        def answered(d):
            bots = d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
            return bots and bots[-1].text.strip() or False

        shown = wait.until(answered)
        time.sleep(1.0)  # let the stream finish
        shown = answered(driver)
        users = driver.find_elements(By.CSS_SELECTOR, '[data-testid="user"]')
        assert any("What shape is it?" in u.text for u in users)
        assert driver.find_elements(By.CSS_SELECTOR, '[data-testid="user"] img')  # the image is in the chat
    finally:
        driver.quit()
    assert shown == ask(demo, "What shape is it?", [demo["images"][1]]).strip()


def test_only_uploads_are_ever_opened(tmp_path):
    """A request naming a server file (not an upload), or history text that happens to be a path,
    never reaches the model: typed text is text, and images must come from Gradio's upload cache."""
    from tools.app import make_chat

    class Model:
        requests = []

        def stream(self, request, sampling):
            self.requests.append(request)
            yield "fine"

    model = Model()
    chat = make_chat(model, 2048)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the web")
    assert list(chat({"text": "Describe it", "files": [str(secret)]}, [], 6, 0.0, 1.0)) == [
        "⚠ images must be uploaded through the page"]
    history = [{"role": "user", "content": str(secret)}, {"role": "assistant", "content": "ok"}]
    assert list(chat({"text": "And now?", "files": []}, history, 6, 0.0, 1.0)) == ["fine"]
    assert model.requests[-1].image_paths == [] and str(secret) in model.requests[-1].prompt


def chatting(chat, client: str):
    """say(text, files, top_p) -> answer: one message as Gradio sends it to `chat`, and the history
    as Gradio then keeps it: the API's session state, or the page's chatbot (its messages
    normalised into typed parts)."""
    history = []

    def say(text, files=(), top_p=1.0):
        answer = list(chat({"text": text, "files": [str(f) for f in files]}, list(history), 6, 0.0, top_p))[-1]
        if client == "api":
            history.append({"role": "user", "content": [{"path": str(f)} for f in files] + ([text] if text else [])})
            history.append({"role": "assistant", "content": answer})
        else:
            parts = [{"type": "file", "file": {"path": str(f)}, "alt_text": None} for f in files]
            history.append({"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else []),
                            "metadata": None, "options": None})
            history.append({"role": "assistant", "content": [{"type": "text", "text": answer}],
                            "metadata": None, "options": None})
        return answer
    return say


@pytest.mark.parametrize("client", ["api", "page"])
def test_an_image_goes_where_the_reference_demo_puts_it(tmp_path, monkeypatch, client):
    """As the reference demo (LLaVA's add_text and vicuna_v1 get_prompt): an image uploaded with a
    later question stays in that question, after its text; a second image starts the conversation
    over with it, and later questions are about it."""
    from PIL import Image

    from megatron_eve.data.templates import VICUNA_SYSTEM
    from tools.app import make_chat

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # the files below count as uploads
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    Image.new("RGB", (16, 16), (200, 0, 0)).save(first)
    Image.new("RGB", (16, 16), (0, 0, 200)).save(second)
    requests = []

    class Model:
        def stream(self, request, sampling):
            requests.append(request)
            yield "an answer"

    say = chatting(make_chat(Model(), 2048), client)
    say("What is two plus three?")
    say("What is in this picture?", [first])
    assert requests[-1].image_paths == [str(first)]
    assert requests[-1].prompt == (f"{VICUNA_SYSTEM} USER: What is two plus three? ASSISTANT: an answer</s>"
                                   "USER: What is in this picture?\n<image> ASSISTANT:")
    say("And this one?", [second])
    assert requests[-1].image_paths == [str(second)]
    assert requests[-1].prompt == f"{VICUNA_SYSTEM} USER: <image>\nAnd this one? ASSISTANT:"
    say("Which colour?")
    assert requests[-1].image_paths == [str(second)]
    assert requests[-1].prompt == (f"{VICUNA_SYSTEM} USER: <image>\nAnd this one? ASSISTANT: an answer</s>"
                                   "USER: Which colour? ASSISTANT:")


@pytest.mark.parametrize("client", ["api", "page"])
def test_notices_and_failed_uploads_are_not_fed_back_to_the_model(tmp_path, monkeypatch, client):
    """The demo's own notices (an unreadable upload, a bad value, no question) are not answers: their
    exchanges stay out of the conversation the model is given, and a failed upload is not kept as
    the chat's image, so a later text-only question is about the last image the model answered."""
    from PIL import Image

    from megatron_eve.inference.backends import open_images
    from megatron_eve.inference.generate import PromptError
    from tools.app import make_chat

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # the files below count as uploads
    good, broken = tmp_path / "good.png", tmp_path / "upload.jpg"
    Image.new("RGB", (16, 16), (200, 0, 0)).save(good)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")

    class Model:
        requests = []

        def stream(self, request, sampling):
            self.requests.append(request)
            try:
                open_images(request.image_paths)  # as the backends do
            except PromptError as error:
                yield error
                return
            yield "a red square"

    model = Model()
    say = chatting(make_chat(model, 2048), client)
    assert say("Describe it", [good]) == "a red square"
    assert say("What is this?", [broken]).startswith("⚠ image upload.jpg cannot be read")
    assert say("Describe it again", top_p=0) == "⚠ top_p must be in (0, 1], not 0.0"
    assert say("", [broken]) == "Please ask a question (an image alone is not a question)."
    assert say("What colour is it?") == "a red square"
    last = model.requests[-1]
    assert last.image_paths == [str(good)]
    assert last.prompt.count("USER:") == 2 and last.prompt.count("ASSISTANT: a red square</s>") == 1
    for left_out in ("⚠", "cannot be read", "top_p", "Please ask", "What is this?", "Describe it again"):
        assert left_out not in last.prompt
    assert last.prompt.endswith(
        "USER: <image>\nDescribe it ASSISTANT: a red square</s>USER: What colour is it? ASSISTANT:")


def test_an_uploaded_photo_is_turned_upright_as_the_reference_demo_turns_it(tmp_path, monkeypatch):
    """A phone photo is stored sideways with an EXIF orientation: the reference demo's upload box
    (gr.Image(type="pil"), Gradio's own preprocessing) turns it upright, so the demo does too; the
    reference's evaluation opens files as stored, and so do eval_vqa and generate.py."""
    import gradio as gr
    import numpy as np
    from gradio.data_classes import ImageData
    from PIL import Image

    from megatron_eve.inference.backends import open_images
    from tools.app import make_chat

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # the file below counts as an upload
    photo = tmp_path / "phone.jpg"
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :8] = (250, 0, 0)  # red on the stored left edge: the top once turned (orientation 6)
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(stored).save(photo, exif=exif, quality=100)

    seen = []

    class Model:
        def stream(self, request, sampling):
            seen.extend(open_images(request.image_paths, request.upright))  # as the backends do
            yield "a photo"

    assert list(make_chat(Model(), 2048)({"text": "What is on top?", "files": [str(photo)]}, [], 6, 0.0, 1.0)) == [
        "a photo"]
    reference = gr.Image(type="pil").preprocess(ImageData(path=str(photo), orig_name="phone.jpg"))
    assert reference.size == (16, 32) and seen[0].size == (16, 32)
    assert np.array_equal(np.array(seen[0]), np.array(reference.convert("RGB")))
    assert open_images([str(photo)])[0].size == (32, 16)  # evaluation and generate.py: as stored


def test_an_abandoned_answer_stops_and_frees_the_model():
    """A client that goes away (Gradio closes its generator) cancels its answer: the model thread
    stops at its next step, and the next client does not wait for the rest of it."""
    from megatron_eve.inference.generate import Sampling
    from tools.app import ModelThread

    steps = []

    class Backend:
        def stream(self, request, sampling, cancel=None):
            for step in range(sampling.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                time.sleep(0.02)
                steps.append(request)
                yield f"{request}{step} "

    model = ModelThread(Backend())
    abandoned = model.stream("a", Sampling(max_new_tokens=500))
    assert next(abandoned) == "a0 "
    abandoned.close()
    started_at = time.time()
    assert list(model.stream("b", Sampling(max_new_tokens=2))) == ["b0 ", "b1 "]
    assert time.time() - started_at < 5 and steps.count("a") < 10
