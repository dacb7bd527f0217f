"""`altclip serve`: the model loaded once and answered over HTTP, by default on a Unix socket.

- transport.py: where the server listens (the socket folder, a stale socket, TCP) and who may
  talk to it (token, Host and Origin checks). Standard library only.
- client.py: a small client (http.client over a Unix socket or TCP). Standard library only: the
  commands use it without importing torch.
- discovery.py: which server a command uses (--server auto, off, a socket, a URL), whether it
  computes what the command would in-process, and the default socket's privacy check.
- remote.py: a server's model (RemoteModel): runtime/embedder.py's primitives as requests, and
  search and index by the server.
- requests.py: the request bodies and their validation (pydantic), image items.
- batcher.py: one model thread; requests that arrive together share a forward pass.
- state.py: what the server's parts share (ServeState) and its health report.
- jobs.py: a request's work: its images decoded in worker threads, its passes on the model thread.
- gate.py: plain ASGI in front of the routes (token, Host, Origin, size cap, log) and the error answers.
- app.py: the HTTP routes (FastAPI), one router per endpoint family.
- searching.py: /v1/search and /v1/index, the search library run with the warm model.
- server.py: binding, uvicorn, the idle timeout, a clean stop.

Only client.py, transport.py, discovery.py and remote.py may be imported without the
`altclip[serve]` extra (the commands' side).
"""
