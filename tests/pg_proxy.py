"""A TCP proxy between a journal and PostgreSQL that injects connection faults.

``cut()`` drops every connection and refuses new ones (the database is unreachable)
until ``heal()``.  ``drop_at_commit(after=True)`` drops the next connection that sends
a ``COMMIT``, after forwarding it (the commit happened, its answer is lost) or before
(it never happened).
"""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.refusing = False
        self._commit_drop: bool | None = None
        self.dropped_commits = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._muted: set[int] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a postgresql:// URL to the target) pointed at this proxy."""
        host = f"{self.target[0]}:{self.target[1]}"
        assert host in dsn, (host, dsn)
        return dsn.replace(host, f"127.0.0.1:{self.port}")

    def cut(self) -> None:
        self.refusing = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def heal(self) -> None:
        self.refusing = False

    def drop_at_commit(self, *, after: bool) -> None:
        self._commit_drop = after

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        pair = (writer, up_writer)
        await asyncio.gather(self._pump(reader, up_writer, pair, client=True),
                             self._pump(up_reader, writer, pair, client=False),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, ...], client: bool) -> None:
        link = id(pair[0])
        try:
            while data := await reader.read(65536):
                if not client and link in self._muted:
                    continue  # the COMMIT's answer is lost on its way back
                drop = client and self._commit_drop is not None and b"COMMIT" in data.upper()
                if drop and not self._commit_drop:
                    self._commit_drop = None
                    self.dropped_commits += 1
                    self._abort(pair)  # never sent: the transaction did not commit
                    return
                if drop:
                    self._muted.add(link)  # from now on the server's answers go nowhere
                writer.write(data)
                await writer.drain()
                if drop:
                    # Sent: the server commits; give it the time to, then cut the link.
                    self._commit_drop = None
                    self.dropped_commits += 1
                    await asyncio.sleep(0.1)
                    self._abort(pair)
                    return
        finally:
            self._abort(pair)

    def _abort(self, pair: tuple[asyncio.StreamWriter, ...]) -> None:
        for w in pair:
            with contextlib.suppress(Exception):
                w.transport.abort()
            self._links.discard(w)
