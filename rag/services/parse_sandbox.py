"""Parsing an upload in a child process, with a time and a memory limit.

A crafted file can make a parser run for minutes or eat all memory: 10,000 nested
``<h1>`` took 89 s (the cost grows with the square of the depth), PDFs are built to
exhaust pypdf, a DOCX can hold XML that unzips to just under the zip-bomb limit. Run in
the worker's own process, such a file wedged or killed the worker; here only the child
is stopped, the document fails with a reason a person can act on, and the worker goes on.

The children fork from a forkserver that has the parsers imported already: a fork costs
milliseconds, and forking the worker itself (threads, database connections) would not
be safe.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
from functools import cache
from multiprocessing.connection import Connection

from django.conf import settings

from rag.services.parsing import ParsedDocument, ParseError, parse_document

#: The settings the parsers read, handed to the child (which never loads the project's).
_PARSER_SETTINGS = ("RAG_MAX_UPLOAD_MB", "RAG_MAX_UNZIPPED_MB")


def parse(*, name: str, data: bytes) -> ParsedDocument:
    """``parse_document`` in a child process limited to RAG_PARSE_TIMEOUT_S seconds of CPU
    and RAG_PARSE_MEMORY_MB of memory; raises ParseError when it fails or breaks a limit."""
    seconds, megabytes = settings.RAG_PARSE_TIMEOUT_S, settings.RAG_PARSE_MEMORY_MB
    values = {key: getattr(settings, key) for key in _PARSER_SETTINGS}
    receiving, sending = _context().Pipe(duplex=False)
    child = _context().Process(target=_child, args=(sending, name, data, values, seconds, megabytes), daemon=True)
    child.start()
    sending.close()
    try:
        # CPU time is limited in the child; this bounds the wall time too (a child that sleeps).
        if not receiving.poll(seconds * 2 + 5):
            raise _too_slow(name, seconds)
        try:
            outcome, value = receiving.recv()
        except EOFError:
            child.join(5)
            if child.exitcode == -signal.SIGXCPU:
                raise _too_slow(name, seconds) from None
            raise ParseError(
                f"Parsing {name} stopped the parser (exit {child.exitcode}): it probably needs more than "
                f"{megabytes} MB of memory (RAG_PARSE_MEMORY_MB). If it is a genuine document, save it again.",
                code="parser_died",
            ) from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiving.close()
    if outcome == "error":
        raise ParseError(value["message"], code=value["code"])
    return value


def _too_slow(name: str, seconds: float) -> ParseError:
    return ParseError(
        f"{name} took more than {seconds:g} s to parse (RAG_PARSE_TIMEOUT_S), so it was given up: "
        "it may be built to be slow (deeply nested HTML, say). If it is a genuine document, save it "
        "again in a simpler form.",
        code="too_slow",
    )


@cache
def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["rag.services.parsing", "pypdf", "docx", "bs4", "charset_normalizer"])
    return context


def _child(sending: Connection, name: str, data: bytes, values: dict, seconds: float, megabytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (int(seconds) + 1, int(seconds) + 2))
    # On top of what the child already maps (the interpreter and the parsers).
    limit = _address_space() + megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if not settings.configured:
        settings.configure(**values)
    try:
        sending.send(("ok", parse_document(name=name, data=data)))
    except ParseError as exc:
        message = exc.message
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > megabytes * 1024 * 1024 // 2:
            # lxml, out of memory, reports an "unknown error" in the XML: say what it more likely was.
            message += f" Parsing it took over {megabytes // 2} MB of memory; RAG_PARSE_MEMORY_MB allows {megabytes}."
        sending.send(("error", {"message": message, "code": exc.code}))
    except MemoryError:
        message = f"{name} needs more than {megabytes} MB of memory to parse (RAG_PARSE_MEMORY_MB), so it was given up."
        sending.send(("error", {"message": message, "code": "too_big"}))
    except RecursionError:
        message = f"{name} is nested too deeply to parse. If it is a genuine document, save it again in a simpler form."
        sending.send(("error", {"message": message, "code": "too_deep"}))
    except Exception as exc:  # a parser's bug on this file: the document fails, the worker goes on
        message = f"{name} could not be parsed ({type(exc).__name__}: {str(exc)[:200]})."
        sending.send(("error", {"message": message, "code": "unreadable"}))
    finally:
        sending.close()


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
