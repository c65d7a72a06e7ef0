"""Run the real llama.cpp (the `llama-cpp-cffi` wheel, its low-level C functions on a local file) in a subprocess.

The wheel is built with GCC 14 and needs two C++ runtime symbols that an older libstdc++ (Debian 12: GCC 12) lacks,
`__cxa_call_terminate` and `std::ios_base_library_init()`. Both are unversioned, so a 10-line shim compiled here with
the system g++ and preloaded into that subprocess only provides them: the first terminates as GCC 14's does, the
second is a no-op because the shim's own <iostream> static initializer sets up the standard streams (what GCC 14's
library does itself). Nothing is installed and the test process is untouched.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SHIM = textwrap.dedent("""
    #include <cxxabi.h>
    #include <exception>
    #include <iostream>
    extern "C" void __cxa_call_terminate(void *exception) noexcept {
      if (exception) __cxxabiv1::__cxa_begin_catch(exception);
      std::terminate();
    }
    namespace std { void ios_base_library_init() {} }
""")

PROBE = textwrap.dedent("""
    import json, sys
    from llama.llama_cpp import lib, ffi
    request = json.loads(sys.stdin.read())
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = not request.get("logits")
    model = lib.llama_model_load_from_file(request["path"].encode(), params)
    if model == ffi.NULL:
        sys.exit("llama.cpp could not load " + request["path"])
    vocab = lib.llama_model_get_vocab(model)
    out = {"add_bos": bool(lib.llama_vocab_get_add_bos(vocab)), "ids": [], "logits": []}
    for text in request.get("texts", []):
        data = text.encode()
        room = len(data) + 8
        buf = ffi.new("llama_token[]", room)
        n = lib.llama_tokenize(vocab, data, len(data), buf, room, False, False)
        out["ids"].append([buf[i] for i in range(n)])
    for ids in request.get("logits", []):
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = len(ids) + 8
        cparams.n_batch = len(ids) + 8
        context = lib.llama_init_from_model(model, cparams)
        tokens = ffi.new("llama_token[]", ids)
        if lib.llama_decode(context, lib.llama_batch_get_one(tokens, len(ids))) != 0:
            sys.exit("llama_decode failed")
        row = lib.llama_get_logits_ith(context, -1)
        out["logits"].append([row[i] for i in range(lib.llama_vocab_n_tokens(vocab))])
        lib.llama_free(context)
    lib.llama_model_free(model)
    print(json.dumps(out))
""")


def _run(code: str, stdin: str, preload: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = preload
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, env=env,
                          timeout=600)


@functools.lru_cache(maxsize=1)
def llama_cpp_runtime() -> tuple[str | None, str | None]:
    """(LD_PRELOAD value or None, reason llama.cpp cannot run here or None)."""
    spec = importlib.util.find_spec("llama")
    if spec is None or not (Path(spec.origin).parent / "llama_cpp.py").is_file():
        return None, "llama-cpp-cffi is not installed (pip install llama-cpp-cffi cffi)"
    check = "from llama.llama_cpp import lib"
    plain = _run(check, "", None)
    if plain.returncode == 0:
        return None, None
    if "undefined symbol" not in plain.stderr:
        return None, f"llama-cpp-cffi does not import: {plain.stderr.strip().splitlines()[-1]}"
    compiler = shutil.which("g++")
    if compiler is None:
        return None, "llama-cpp-cffi needs a GCC 14 C++ runtime and there is no g++ to build the two-symbol shim"
    folder = Path(tempfile.mkdtemp(prefix="llama-cpp-shim-"))
    (folder / "shim.cpp").write_text(SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(folder / "libshim.so"), str(folder / "shim.cpp")],
                   check=True, capture_output=True)
    preload = str(folder / "libshim.so")
    shimmed = _run(check, "", preload)
    if shimmed.returncode != 0:
        return None, f"llama-cpp-cffi does not import even with the shim: {shimmed.stderr.strip().splitlines()[-1]}"
    return preload, None


def llama_cpp(path: Path, texts: list[str] = (), logits: list[list[int]] = ()) -> dict:
    """llama.cpp's token ids for `texts` (no BOS, no special-token parsing), its add_bos flag, and the last-position
    logits for each id list in `logits`."""
    preload, reason = llama_cpp_runtime()
    assert reason is None, reason
    result = _run(PROBE, json.dumps({"path": str(path), "texts": list(texts), "logits": [list(x) for x in logits]}),
                  preload)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
