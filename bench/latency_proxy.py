"""A TCP proxy that delays what passes through it, as a server a round trip away answers late."""

from __future__ import annotations

import socket
import threading
import time


class LatencyProxy:
    """Listens on 127.0.0.1:<free port> and forwards to 127.0.0.1:target_port, holding each chunk
    of a request for request_delay seconds and each chunk of an answer for answer_delay seconds."""

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
        try:
            while data := source.recv(65536):
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
