#!/usr/bin/env python3
"""A local web chat with an EVE model: upload an image, ask, watch the answer stream in.

  python tools/app.py --load checkpoints/eve-7b-sft-672 --tokenizer-model vicuna-7b-v1.5
  # then open http://127.0.0.1:7860

Listens on loopback unless --host says otherwise. Needs only the Python standard library on top
of megatron_eve. API (what the page uses):
  GET  /api/health                       → {"status": "ok", "model": ...}
  POST /api/chat   {"messages": [{"role": "user"|"assistant", "content": "..."}],
                    "image": "<base64 PNG/JPEG>" (optional), "max_new_tokens", "temperature", "top_p"}
                   → text/event-stream: "data: {"text": "..."}" per piece, then "data: [DONE]"
"""

import argparse
import base64
import json
import os
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eve.data.templates import VICUNA_SYSTEM  # noqa: E402
from megatron_eve.inference.generate import PromptError, Sampling  # noqa: E402

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>EVE chat</title><style>
body{font-family:sans-serif;max-width:760px;margin:2em auto}#log div{margin:.5em 0;white-space:pre-wrap}
.user{color:#124}.assistant{color:#241}img{max-width:320px;display:block}textarea{width:100%}</style></head><body>
<h2>EVE</h2><input type="file" id="file" accept="image/*"><img id="preview"><div id="log"></div>
<textarea id="text" rows="3" placeholder="Ask about the image"></textarea><button id="send">Send</button>
<script>
let messages=[], image=null;
file.onchange=()=>{const r=new FileReader();r.onload=()=>{image=r.result.split(',')[1];preview.src=r.result;
  messages=[];log.innerHTML='';};r.readAsDataURL(file.files[0]);};
function add(role,text){const d=document.createElement('div');d.className=role;d.textContent=text;log.appendChild(d);return d;}
send.onclick=async()=>{const q=text.value.trim();if(!q)return;text.value='';add('user',q);messages.push({role:'user',content:q});
  const out=add('assistant','');const resp=await fetch('/api/chat',{method:'POST',headers:{'Content-Type':'application/json'},
  body:JSON.stringify({messages,image})});const reader=resp.body.getReader();const dec=new TextDecoder();let buf='';
  while(true){const {value,done}=await reader.read();if(done)break;buf+=dec.decode(value,{stream:true});
    let i;while((i=buf.indexOf('\\n\\n'))>=0){const line=buf.slice(0,i);buf=buf.slice(i+2);if(!line.startsWith('data: '))continue;
      const data=line.slice(6);if(data==='[DONE]')continue;const m=JSON.parse(data);if(m.error)out.textContent='error: '+m.error;
      else out.textContent+=m.text;}}
  messages.push({role:'assistant',content:out.textContent});};
</script></body></html>"""


def conversation_prompt(messages, with_image: bool) -> str:
    """vicuna_v1 over the whole conversation, the image at the start of the first question."""
    text = VICUNA_SYSTEM + " "
    for index, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "user":
            if index == 0 and with_image:
                content = "<image>\n" + content
            text += f"USER: {content} "
        else:
            text += f"ASSISTANT: {content}</s>"
    return text + "ASSISTANT:"


class ChatHandler(BaseHTTPRequestHandler):
    backend = None
    model_name = ""
    default_max_new_tokens = 256

    def log_message(self, *args):  # quiet
        pass

    def _json(self, code: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/api/health":
            return self._json(200, {"status": "ok", "model": self.model_name})
        if self.path in ("/", "/index.html"):
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        return self._json(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        if self.path != "/api/chat":
            return self._json(404, {"error": "not found"})
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages = request["messages"]
            if not messages or messages[-1]["role"] != "user":
                raise ValueError("messages must end with a user message")
        except (ValueError, KeyError, TypeError) as error:
            return self._json(400, {"error": f"bad request: {error}"})
        sampling = Sampling(max_new_tokens=int(request.get("max_new_tokens", self.default_max_new_tokens)),
                            temperature=float(request.get("temperature", 0.0)), top_p=float(request.get("top_p", 1.0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            if request.get("image"):
                path = os.path.join(tmp, "image")
                with open(path, "wb") as handle:
                    handle.write(base64.b64decode(request["image"]))
                paths.append(path)
            from megatron_eve.inference.backends import Request

            try:
                for piece in self.backend.stream(Request(conversation_prompt(messages, bool(paths)), paths), sampling):
                    self.wfile.write(f"data: {json.dumps({'text': piece})}\n\n".encode())
                    self.wfile.flush()
            except PromptError as error:
                self.wfile.write(f"data: {json.dumps({'error': str(error)})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def main(argv=None) -> int:
    from tools.generate import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    if args.hf or args.tensor_model_parallel_size * args.pipeline_model_parallel_size != 1:
        raise SystemExit("error: the demo serves a megatron checkpoint in one process (TP = PP = 1)")
    from tools.generate import setup

    ChatHandler.backend, _ = setup(args)
    ChatHandler.model_name = os.path.basename(os.path.normpath(args.load))
    ChatHandler.default_max_new_tokens = args.max_new_tokens
    # One thread: generation runs where the CPU shim (thread-local) and the model live, and
    # requests are answered one after another anyway.
    server = HTTPServer((args.host, args.port), ChatHandler)
    print(f"EVE chat on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
