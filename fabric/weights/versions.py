"""The receiving side's version state machine, apart from any transport: stage, verify, commit, resume, status.

A version is staged chunk by chunk into a shared-memory StagingBuffer; every chunk is bounds-checked against the
manifest and its crc32c verified. Only when every chunk is there does it commit into the engine; until then the
previous version keeps serving. A stream that breaks leaves the partial version staged (resumable: `status()` lists
its chunks); a bad chunk drops it. Transports (fabric.weights.transports) feed chunks in; they never touch state.

Two staging files alternate: the serving version's (kept) and the next one's. Both stay faulted in (a fresh file's
first-touch page faults cost as much as the network), and a commit that fails inside the engine is rolled back by
loading the serving version's file again, so the engine always ends a failed update on the previous version.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from fabric.errors import FabricError, invalid, precondition, unavailable
from fabric.rollout.engine import SleepState
from fabric.v1 import rollout_pb2, weights_pb2
from fabric.weights import manifest as mf
from fabric.weights.digest import DIGEST_BYTES, digest_bytes
from fabric.weights.staging import StagingBuffer, UpdateInfo, layout

log = logging.getLogger(__name__)

PARALLEL_STREAM_WAIT_S = 600  # parallel streams of one version: how long the others wait for the last to commit


@dataclass
class StagedVersion:
    version: int
    manifest: weights_pb2.WeightManifest
    digest: str
    buffer: StagingBuffer | None
    received: bytearray  # one flag per chunk
    received_count: int = 0
    bytes_received: int = 0
    committed: bool = False
    commit_seconds: float = 0.0
    failed: FabricError | None = None
    streams: int = 0  # open streams feeding it now; 0: a partial version left by a broken stream, kept to resume
    tensor_digests: tuple[bytes, ...] = ()  # the sender's content digests (fabric.weights.digest); () : unchecked
    content_checked: bool = False  # a transport that received into memory of its own checked the digests there
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def complete(self) -> bool:
        return self.received_count == len(self.manifest.chunks)


class VersionStore:
    """begin -> accept* (or place + mark, for transports that receive into the buffer themselves) -> finish."""

    def __init__(self, engine, server_name: str):
        self.engine = engine
        self.server_name = server_name
        self.expected = mf.expected_from_hf_config(engine.hf_config, engine.dtype)
        self.optional = mf.optional_names(engine.hf_config)
        self.tied = bool(self.optional)
        self.staged: StagedVersion | None = None
        self.serving: StagedVersion | None = None  # the committed version whose staging file is kept (rollback)
        self._spare: StagingBuffer | None = None  # a retired file, reused for the next version of the same layout
        self.serving_digest = ""
        self._lock = threading.Lock()  # state is touched from the event loop and from data-plane threads
        self._commit_lock = asyncio.Lock()

    @property
    def serving_version(self) -> int:
        return int(self.engine.weight_version)

    # ---- staging ---------------------------------------------------------------------------------------------

    def begin(self, header: rollout_pb2.UpdateWeightsHeader) -> StagedVersion | None:
        """Validates a header; returns the version to stage into, or None when it is already serving."""
        version = header.weight_version
        if version <= 0:
            raise invalid("header.weight_version", f"must be a positive integer, got {version}")
        if version < self.serving_version:
            raise precondition(
                f"weight_version {version} is older than the serving version {self.serving_version}: "
                "send a newer version",
                "STALE_VERSION",
                "header.weight_version",
            )
        if version == self.serving_version:
            return None
        if self.engine.sleep_state == SleepState.ASLEEP:
            raise unavailable("the server is asleep: WakeUp(tags=['weights']) before sending weights", "ASLEEP")
        mf.check_manifest(header.manifest, self.expected, self.optional)
        digests = _check_digests(header)
        digest = mf.digest(header.manifest)
        with self._lock:
            staged = self.staged
            if staged is not None and staged.version == version and not staged.committed:
                if staged.digest != digest:
                    raise precondition(
                        f"version {version} is already being staged with a different manifest "
                        f"(digest {staged.digest}): resend the same tensors and chunking, or use a new version",
                        "MANIFEST_CHANGED",
                        "header.manifest",
                    )
                if digests and not staged.tensor_digests:
                    staged.tensor_digests = digests  # the whole version is checked at commit, what came before too
                elif digests and digests != staged.tensor_digests:
                    raise precondition(
                        f"version {version} is already being staged with other content digests: resend the same "
                        "tensors, or use a new version",
                        "CONTENT_CHANGED",
                        "header.tensor_digests",
                    )
                staged.streams += 1
                return staged  # a resume or a parallel stream of the same version
            if staged is not None and staged.version > version and not staged.committed:
                if staged.streams:
                    raise precondition(
                        f"version {staged.version} is arriving now; {version} is older: send a version newer "
                        f"than {staged.version}, or wait for it to commit",
                        "STALE_VERSION",
                        "header.weight_version",
                    )
                # Nobody feeds it (its sender died, e.g. a trainer since restarted): it must not lock the server out.
                log.warning(
                    "dropping partial version %d (%d/%d chunks, no stream feeding it) for version %d",
                    staged.version,
                    staged.received_count,
                    len(staged.manifest.chunks),
                    version,
                )
            if staged is not None:
                self._drop_locked(staged)
            specs = [(t.name, mf.PROTO_TO_TORCH[t.dtype], tuple(t.shape)) for t in header.manifest.tensors]
            self.staged = StagedVersion(
                version, header.manifest, digest, self._buffer_locked(specs), bytearray(len(header.manifest.chunks))
            )
            self.staged.streams = 1
            self.staged.tensor_digests = digests
            return self.staged

    def release(self, staged: StagedVersion | None) -> None:
        """A stream that began feeding `staged` has ended, however it ended."""
        if staged is not None:
            with self._lock:
                staged.streams -= 1
                if staged.streams == 0 and self.staged is not staged:
                    self._retire_locked(staged)

    def chunk_spec(self, staged: StagedVersion, chunk: weights_pb2.WeightChunk, length: int) -> weights_pb2.ChunkSpec:
        """Bounds: the chunk must be the manifest's chunk at that index (same tensor, offset, length)."""
        chunks = staged.manifest.chunks
        if not 0 <= chunk.chunk_index < len(chunks):
            raise invalid(
                "chunk.chunk_index",
                f"{chunk.chunk_index} is not a chunk of this version (0..{len(chunks) - 1})",
                "UNKNOWN_CHUNK",
            )
        spec = chunks[chunk.chunk_index]
        tensor = staged.manifest.tensors[spec.tensor_index]
        if chunk.tensor_index != spec.tensor_index:
            raise invalid(
                "chunk.tensor_index",
                f"chunk {chunk.chunk_index} belongs to tensor {tensor.name!r}, not tensor #{chunk.tensor_index}",
                "CHUNK_MISMATCH",
            )
        if chunk.offset != spec.offset or chunk.offset + length > tensor.nbytes or length != spec.length:
            raise invalid(
                "chunk.data",
                f"chunk {chunk.chunk_index} of tensor {tensor.name!r} covers "
                f"[{chunk.offset}, {chunk.offset + length}) but the manifest says "
                f"[{spec.offset}, {spec.offset + spec.length}) of {tensor.nbytes} bytes "
                "(past the tensor's end or misplaced)",
                "CHUNK_OUT_OF_BOUNDS",
            )
        return spec

    def accept(self, staged: StagedVersion, chunk: weights_pb2.WeightChunk, data) -> None:
        """Verifies and stores one chunk whose bytes are in `data`."""
        spec = self.chunk_spec(staged, chunk, len(data))
        self.verify(staged, chunk, data)
        assert staged.buffer is not None  # retired only once no stream feeds the version
        staged.buffer.write(spec.tensor_index, spec.offset, data)
        self.mark(staged, chunk.chunk_index, len(data))

    def verify(self, staged: StagedVersion, chunk: weights_pb2.WeightChunk, data) -> None:
        if mf.crc32c(data) != chunk.crc32c:
            name = staged.manifest.tensors[chunk.tensor_index].name
            raise invalid(
                "chunk.crc32c",
                f"checksum mismatch in chunk {chunk.chunk_index} of tensor {name!r} "
                "(corrupted in transit): the version is dropped, resend it",
                "CHECKSUM_MISMATCH",
            )

    def mark(self, staged: StagedVersion, index: int, length: int) -> None:
        with self._lock:
            if not staged.received[index]:
                staged.received[index] = 1
                staged.received_count += 1
            staged.bytes_received += length

    def fail(self, staged: StagedVersion, error: FabricError) -> None:
        """A bad chunk: the staged version is dropped, the serving one is untouched."""
        with self._lock:
            staged.failed = error
            if self.staged is staged:
                self._drop_locked(staged)
        staged.done.set()

    # ---- buffers ---------------------------------------------------------------------------------------------

    def _drop_locked(self, staged: StagedVersion) -> None:
        if self.staged is staged:
            self.staged = None
        if staged.streams == 0:
            self._retire_locked(staged)
        # else: the last stream still feeding it retires it when it ends (release), so nothing writes into a
        # buffer that was closed or handed to the next version

    def _retire_locked(self, staged: StagedVersion) -> None:
        if staged.buffer is None or staged is self.serving:
            return  # the serving version's file stays: it is the rollback
        if self._spare is None:
            self._spare = staged.buffer
        else:
            staged.buffer.close()
        staged.buffer = None

    def _buffer_locked(self, specs) -> StagingBuffer:
        spare, self._spare = self._spare, None
        if spare is not None and not spare.file_intact():
            log.warning("staging file %s is gone (deleted from under the server): not reused", spare.path)
            spare.close()
            spare = None
        if spare is not None and spare.slots == layout(specs)[0]:
            return spare  # stale bytes: every chunk is written (and verified) again before the version can commit
        if spare is not None:
            spare.close()
        return StagingBuffer(specs)

    # ---- commit ----------------------------------------------------------------------------------------------

    async def finish(
        self, staged: StagedVersion, started: float, wait_for_others: bool = False
    ) -> rollout_pb2.WeightUpdateResult:
        """Commits when complete (once, whichever stream gets here first); otherwise reports the partial state."""
        result = rollout_pb2.WeightUpdateResult(
            server=self.server_name, weight_version=staged.version, bytes_received=staged.bytes_received
        )
        if staged.complete and not staged.committed and staged.failed is None:
            async with self._commit_lock:
                if not staged.committed and staged.failed is None:
                    if staged.version <= self.serving_version:
                        # a newer version committed while this one was arriving: serving it now would go back
                        self.fail(staged, self._superseded(staged))
                    elif not self._content_matches(staged):
                        pass  # failed (and dropped) by the check
                    else:
                        await self._commit(staged)
        if not staged.complete and wait_for_others and staged.failed is None:
            try:  # parallel streams of one version: the last to finish commits, the others wait for it
                await asyncio.wait_for(staged.done.wait(), timeout=PARALLEL_STREAM_WAIT_S)
            except TimeoutError:
                pass
        if staged.failed is not None:
            result.error.CopyFrom(staged.failed.to_proto())
        result.committed = staged.committed
        result.seconds = time.perf_counter() - started
        result.commit_seconds = staged.commit_seconds
        return result

    @staticmethod
    def _superseded(staged: StagedVersion) -> FabricError:
        return precondition(
            f"version {staged.version} arrived after a newer version committed: it is not served (versions never go "
            "back); send a version newer than the serving one",
            "STALE_VERSION",
            "header.weight_version",
        )

    def _content_matches(self, staged: StagedVersion) -> bool:
        """The staged bytes against the sender's digests (when it sent them); a mismatch fails and drops the version."""
        if not staged.tensor_digests or staged.content_checked:
            return True
        assert staged.buffer is not None
        bad = content_mismatch(staged, staged.buffer.tensor)
        if bad is not None:
            self.fail(staged, bad)
            return False
        return True

    def _update_info(self, staged: StagedVersion) -> UpdateInfo:
        assert staged.buffer is not None  # complete versions keep their buffer until committed or dropped
        return staged.buffer.update_info(
            tie_lm_head=self.tied and "lm_head.weight" not in {t.name for t in staged.manifest.tensors}
        )

    async def _commit(self, staged: StagedVersion) -> None:
        start = time.perf_counter()
        try:
            await self.engine.commit_weights(self._update_info(staged), staged.version)
        except Exception as exc:  # the engine refused: put the serving version back and keep serving it
            log.exception("commit of version %d failed", staged.version)
            restored = await self._roll_back()
            with self._lock:
                staged.failed = FabricError(
                    grpc.StatusCode.INTERNAL,
                    f"commit of version {staged.version} into the engine failed: {exc}; {restored}",
                    "COMMIT_FAILED",
                )
                self._drop_locked(staged)
            staged.done.set()
            return
        staged.commit_seconds = time.perf_counter() - start
        with self._lock:
            staged.committed = True
            self.serving_digest = staged.digest
            previous, self.serving = self.serving, staged
            if previous is not None:
                self._retire_locked(previous)
            self._drop_locked(staged)
        staged.done.set()
        log.info(
            "weight version %d committed (%.1f MB, commit %.3f s)",
            staged.version,
            staged.manifest.total_bytes / 1e6,
            staged.commit_seconds,
        )

    async def _roll_back(self) -> str:
        """After a failed commit the engine has ended the update, but layers it loaded before the failure hold the
        new weights: load the serving version's file again so every layer is the previous version's."""
        serving = self.serving
        if serving is None or serving.buffer is None:
            return f"version {self.serving_version} keeps serving (the layers that loaded nothing kept their weights)"
        try:
            await self.engine.commit_weights(self._update_info(serving), serving.version)
        except Exception as exc:
            log.exception("rollback to version %d failed", serving.version)
            return f"rolling back to version {serving.version} failed too ({exc}): restart this server"
        return f"version {serving.version} restored and serving"

    # ---- status and shutdown ---------------------------------------------------------------------------------

    def fill_status(self, response: rollout_pb2.GetWeightsStatusResponse) -> None:
        response.serving_version = self.serving_version
        response.serving_manifest_digest = self.serving_digest
        response.dtype = str(self.engine.dtype).removeprefix("torch.")
        with self._lock:
            staged = self.staged
            if staged is not None and not staged.committed:
                response.staged_version = staged.version
                response.staged_manifest_digest = staged.digest
                response.total_chunks = len(staged.manifest.chunks)
                response.staged_chunk_indices.extend(i for i, r in enumerate(staged.received) if r)

    def already(self, version: int) -> rollout_pb2.WeightUpdateResult:
        return rollout_pb2.WeightUpdateResult(
            server=self.server_name, weight_version=version, committed=True, already_committed=True
        )

    def close(self) -> None:
        """Deletes every staging file (they live in RAM-backed /dev/shm)."""
        with self._lock:
            for staged in (self.staged, self.serving):
                if staged is not None and staged.buffer is not None:
                    staged.buffer.close()
                    staged.buffer = None
            self.staged = self.serving = None
            if self._spare is not None:
                self._spare.close()
                self._spare = None


def _check_digests(header: rollout_pb2.UpdateWeightsHeader) -> tuple[bytes, ...]:
    digests = tuple(header.tensor_digests)
    if digests and (len(digests) != len(header.manifest.tensors) or any(len(d) != DIGEST_BYTES for d in digests)):
        raise invalid(
            "header.tensor_digests",
            f"one {DIGEST_BYTES}-byte digest per tensor of the manifest ({len(header.manifest.tensors)}), got "
            f"{len(digests)}: compute them with fabric.weights.digest.tensor_digests, or send none",
            "BAD_DIGESTS",
        )
    return digests


def content_mismatch(staged: StagedVersion, tensor_bytes) -> FabricError | None:
    """The first tensor whose bytes (`tensor_bytes(i)`: any tensor, any device) do not match the sender's digest."""
    for i, want in enumerate(staged.tensor_digests):
        got = digest_bytes(tensor_bytes(i).reshape(-1).view(torch.uint8))
        if got != want:
            name = staged.manifest.tensors[i].name
            return FabricError(
                grpc.StatusCode.DATA_LOSS,
                f"the bytes of tensor {name!r} received for version {staged.version} do not match the sender's "
                "digest (written by someone else, or never written): the version is dropped, resend it",
                "CONTENT_MISMATCH",
                "header.tensor_digests",
            )
    return None
