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

async function run(client: Client<typeof TurnIdService>): Promise<void> {
  // A fresh thread, so its compaction counter starts at 0.
  const threadId = `example-${randomUUID()}`;

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
