"""A TCP proxy that delays what passes through it, as a server a round trip away answers late."""

from __future__ import annotations

import queue
import socket
import threading
import time


class LatencyProxy:
    """Listens on 127.0.0.1:<free port> and forwards to 127.0.0.1:target_port, delivering what the
    client sends request_delay seconds late and what the server answers answer_delay seconds late."""

    def __init__(self, target_port: int, request_delay: float, answer_delay: float = 0.0) -> None:
        self.target_port = target_port
        self.request_delay = request_delay
        self.answer_delay = answer_delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, self.request_delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.answer_delay), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
        """Copy source to sink, each chunk delay seconds after it arrived. Chunks in flight do not
        wait for each other: a long answer is late by delay, not by delay per chunk."""
        chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def deliver() -> None:
            try:
                while (item := chunks.get()) is not None:
                    due, data = item
                    time.sleep(max(0.0, due - time.monotonic()))
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=deliver, daemon=True).start()
        try:
            while data := source.recv(65536):
                chunks.put((time.monotonic() + delay, data))
        except OSError:
            pass
        chunks.put(None)

    def close(self) -> None:
        self.listener.close()
