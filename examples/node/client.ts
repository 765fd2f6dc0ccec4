// A small turnid client in TypeScript, for an orchestrator to copy.
//
// It uses the stubs that `make stubs-ts` generates (protobuf-es v2) with Connect's gRPC transport
// for Node (HTTP/2, plain gRPC wire protocol), so it talks to `turnid serve` as it is.
//
//   make example-node                       # npm ci, buf generate, tsc -> gen/node
//   node gen/node/examples/node/client.js 127.0.0.1:50051
//   TURNID_TARGET=127.0.0.1:50051 node gen/node/examples/node/client.js
//
// Output: one JSON object per line on stdout ({"event": ...}), so a script or test can check it.
// Exit status 0 when every step behaved as the API promises, 1 otherwise (the reason on stderr).

import { randomUUID } from "node:crypto";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BadRequestSchema, ErrorInfoSchema } from "../../gen/ts/google/rpc/error_details_pb.js";
import {
  TurnIdService,
  TurnKind,
  TurnKindSchema,
  type Turn,
} from "../../gen/ts/turnid/v1/turnid_pb.js";

function emit(event: string, fields: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function turnJson(turn: Turn | undefined): Record<string, unknown> {
  if (turn === undefined) throw new Error("response carried no turn");
  return {
    thread_id: turn.threadId,
    turn_id: turn.turnId,
    kind: TurnKindSchema.value[turn.kind]?.name ?? turn.kind, // "TURN_KIND_REALTIME_DELEGATION"
    sequence: turn.sequence.toString(), // int64 arrives as a bigint
    create_time: turn.createTime ? timestampDate(turn.createTime).toISOString() : null,
    request_id: turn.requestId,
    claimed: turn.claimed,
  };
}

// "INVALID_ARGUMENT" rather than Connect's "InvalidArgument" / 3, to match gRPC's names.
function grpcCodeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

// What an orchestrator branches on: the status code and the ErrorInfo.reason carried in the
// google.rpc.Status details (grpc-status-details-bin), plus the BadRequest field violations.
function refusalJson(rpc: string, error: unknown): Record<string, unknown> {
  const err = ConnectError.from(error);
  const [info] = err.findDetails(ErrorInfoSchema);
  const violations = err
    .findDetails(BadRequestSchema)
    .flatMap((badRequest) => badRequest.fieldViolations)
    .map((v) => ({ field: v.field, description: v.description }));
  return {
    rpc,
    code: grpcCodeName(err.code),
    message: err.rawMessage,
    reason: info?.reason ?? null,
    domain: info?.domain ?? null,
    metadata: info?.metadata ?? {},
    field_violations: violations,
  };
}

function baseUrl(target: string): string {
  return /^https?:\/\//.test(target) ? target : `http://${target}`;
}

// Follows a thread with WatchTurns: every turn after `afterSequence`, exactly once, in order,
// whichever replica allocated it. `established` resolves with the first message that says
// `caughtUp` (the watch has everything that existed when it started), so a caller can wait for
// it before it acts and never miss a turn; `seen(n)` resolves once n turns have arrived.
function watchThread(client: Client<typeof TurnIdService>, threadId: string) {
  const controller = new AbortController();
  const turns: Turn[] = [];
  let markEstablished: () => void = () => {};
  const established = new Promise<void>((resolve) => (markEstablished = resolve));
  let wanted = Number.POSITIVE_INFINITY;
  let markSeen: () => void = () => {};
  const following = (async () => {
    try {
      const stream = client.watchTurns(
        { threadId, afterSequence: 0n },
        { signal: controller.signal, timeoutMs: 0 },
      );
      for await (const message of stream) {
        turns.push(...message.turns);
        if (message.caughtUp) markEstablished();
        if (turns.length >= wanted) markSeen();
      }
    } catch (error) {
      if (!controller.signal.aborted) throw error; // closed by us: done
    }
  })();
  return {
    established,
    seen(count: number): Promise<Turn[]> {
      wanted = count;
      const done = new Promise<void>((resolve) => (markSeen = resolve));
      if (turns.length >= wanted) markSeen();
      return Promise.race([done.then(() => turns.slice(0, count)), following.then(() => turns)]);
    },
    close(): Promise<void> {
      controller.abort();
      return following;
    },
  };
}

async function run(client: Client<typeof TurnIdService>): Promise<void> {
  // A fresh thread, so its compaction counter starts at 0.
  const threadId = `example-${randomUUID()}`;

  // Watch the thread first, and wait until the watch is established: nothing that happens
  // from here on can be missed.
  const watcher = watchThread(client, threadId);
  await watcher.established;
  emit("watching", { thread_id: threadId });

  // A realtime delegation gets a UUIDv7. The request_id makes the call safe to retry after a
  // reconnect: the same request_id returns the same turn instead of minting a second one.
  const requestId = `delegate-${randomUUID()}`;
  const delegation = await client.allocateTurnId({
    threadId,
    kind: TurnKind.REALTIME_DELEGATION,
    requestId,
  });
  emit("allocated", turnJson(delegation.turn));
  const retried = await client.allocateTurnId({
    threadId,
    kind: TurnKind.REALTIME_DELEGATION,
    requestId,
  });
  emit("retried", turnJson(retried.turn));

  // Compactions get auto-compact-N from the thread's durable counter: 0, then 1.
  const allocated = [delegation.turn];
  for (let i = 0; i < 2; i++) {
    const compaction = await client.allocateTurnId({
      threadId,
      kind: TurnKind.AUTO_COMPACTION,
    });
    emit("allocated", turnJson(compaction.turn));
    allocated.push(compaction.turn);
  }

  // Read each one back by id, then the whole thread in sequence order (following page tokens).
  for (const turn of allocated) {
    const got = await client.getTurn({ threadId, turnId: turn?.turnId ?? "" });
    emit("read", turnJson(got.turn));
  }
  let pageToken = "";
  do {
    const page = await client.listTurns({ threadId, pageSize: 100, pageToken });
    for (const turn of page.turns) emit("listed", turnJson(turn));
    pageToken = page.nextPageToken;
  } while (pageToken !== "");

  // Start a turn only if nobody else did since we looked: two windows (or replicas) that race
  // after the same history get exactly one winner; the other learns where the thread is now.
  const thread = (await client.getThread({ threadId })).thread;
  const lastSequence = thread?.lastSequence ?? 0n;
  emit("thread", {
    last_sequence: lastSequence.toString(),
    next_compaction_index: (thread?.nextCompactionIndex ?? 0n).toString(),
    last_turn_id: thread?.lastTurn?.turnId ?? null,
  });
  const started = await client.allocateTurnId({
    threadId,
    kind: TurnKind.USER_INPUT,
    requestId: `start-${randomUUID()}`,
    expectedLastSequence: lastSequence,
  });
  emit("started", turnJson(started.turn));
  try {
    await client.allocateTurnId({
      threadId,
      kind: TurnKind.USER_INPUT,
      expectedLastSequence: lastSequence, // the same history: this one lost the race
    });
    throw new Error("a second conditional start after the same history was accepted");
  } catch (error) {
    if (!(error instanceof ConnectError)) throw error;
    emit("refused", refusalJson("AllocateTurnId", error));
  }

  // Everything allocated above reached the watcher once, in sequence order.
  const watched = await watcher.seen(4);
  emit("watched", { sequences: watched.map((t) => t.sequence.toString()) });
  await watcher.close();

  // A refused request: whitespace is not allowed in a thread_id.
  try {
    await client.allocateTurnId({ threadId: "not a thread id", kind: TurnKind.AUTO_COMPACTION });
    throw new Error("AllocateTurnId with an invalid thread_id was accepted");
  } catch (error) {
    if (!(error instanceof ConnectError)) throw error;
    emit("refused", refusalJson("AllocateTurnId", error));
  }

  // And one refused by state rather than shape: an id the thread does not have.
  try {
    await client.getTurn({ threadId, turnId: "no-such-turn" });
    throw new Error("GetTurn of an unknown turn succeeded");
  } catch (error) {
    if (!(error instanceof ConnectError)) throw error;
    emit("refused", refusalJson("GetTurn", error));
  }
}

async function main(): Promise<number> {
  const target = process.argv[2] ?? process.env.TURNID_TARGET ?? "127.0.0.1:50051";
  const transport = createGrpcTransport({ baseUrl: baseUrl(target), defaultTimeoutMs: 10_000 });
  const client = createClient(TurnIdService, transport);
  emit("target", { target });
  try {
    await run(client);
  } catch (error) {
    const err = ConnectError.from(error);
    process.stderr.write(`turnid example failed: ${grpcCodeName(err.code)}: ${err.message}\n`);
    return 1;
  }
  emit("done", {});
  return 0;
}

process.exitCode = await main();
