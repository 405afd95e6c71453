// A small typed wrapper over the generated fabric.v1 clients (src/gen, from protoc-gen-es; never edited by hand).
// It adds what every caller needs: a deadline, a bearer token, TLS from a CA file, and per-item stream errors
// turned into ConnectError (the native error type of connect-es) with the gRPC code.
import { readFileSync } from "node:fs";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { Error as ProtoError } from "./gen/fabric/v1/common_pb.js";
import {
  AbortRequestSchema,
  GenerateRequestSchema,
  RolloutService,
  RolloutServiceGetServerInfoRequestSchema,
  type GenerateResponse,
  type RolloutServiceGetServerInfoResponse,
} from "./gen/fabric/v1/rollout_pb.js";
import {
  RewardService,
  RewardServiceGetServerInfoRequestSchema,
  ScoreRequestSchema,
  type RewardServiceGetServerInfoResponse,
  type ScoreResponse,
} from "./gen/fabric/v1/reward_pb.js";

export interface ConnectOptions {
  /** host:port of the server. */
  address: string;
  /** Sent on every call as `authorization: Bearer <token>`. */
  token?: string;
  /** A PEM CA bundle: the channel uses TLS and verifies the server against it. Plaintext when absent. */
  caFile?: string;
  /** Deadline of every call in milliseconds (a whole stream counts as one call). None when absent. */
  timeoutMs?: number;
}

/** One refused item of a stream (the response's `error` field): the stream itself goes on. */
export class FabricItemError extends ConnectError {
  constructor(
    readonly requestId: string,
    error: ProtoError,
  ) {
    super(error.message, error.code as Code);
    this.reason = error.reason;
    this.field = error.field;
  }
  readonly reason: string;
  readonly field: string;
}

/** What a stream yields per response: a value, or the error that refused its request. */
export type Outcome<T> =
  | { requestId: string; value: T; error?: undefined }
  | { requestId: string; value?: undefined; error: FabricItemError };

export type GenerateRequestInit = MessageInitShape<typeof GenerateRequestSchema>;
export type ScoreRequestInit = MessageInitShape<typeof ScoreRequestSchema>;
type Requests<T> = Iterable<T> | AsyncIterable<T>;

class Channel {
  readonly sessions: Http2SessionManager;
  readonly transport: Transport;

  constructor(options: ConnectOptions) {
    const baseUrl = `${options.caFile ? "https" : "http"}://${options.address}`;
    const nodeOptions = options.caFile ? { ca: readFileSync(options.caFile) } : {};
    const token = options.token;
    const bearer: Interceptor = (next) => (req) => {
      if (token) req.header.set("authorization", `Bearer ${token}`);
      return next(req);
    };
    // Owning the session manager lets close() end the HTTP/2 connection, so a script exits when it is done.
    this.sessions = new Http2SessionManager(baseUrl, {}, nodeOptions);
    this.transport = createGrpcTransport({
      baseUrl,
      sessionManager: this.sessions,
      interceptors: [bearer],
      defaultTimeoutMs: options.timeoutMs,
    });
  }

  close(): void {
    this.sessions.abort();
  }
}

async function* asAsync<T>(items: Requests<T>): AsyncIterable<T> {
  yield* items;
}

function outcome<T extends { requestId: string; error?: ProtoError }>(response: T): Outcome<T> {
  if (response.error) {
    return { requestId: response.requestId, error: new FabricItemError(response.requestId, response.error) };
  }
  return { requestId: response.requestId, value: response };
}

/** fabric.v1.RolloutService: streaming generation on a vLLM rollout server. */
export class RolloutClient {
  private readonly channel: Channel;
  readonly raw: Client<typeof RolloutService>;

  constructor(options: ConnectOptions) {
    this.channel = new Channel(options);
    this.raw = createClient(RolloutService, this.channel.transport);
  }

  /** Streams requests in; yields samples (or per-request errors) in completion order. */
  async *generate(requests: Requests<GenerateRequestInit>): AsyncIterable<Outcome<GenerateResponse>> {
    const messages = asAsync(requests);
    const stream = this.raw.generate(
      (async function* () {
        for await (const init of messages) yield create(GenerateRequestSchema, init);
      })(),
    );
    for await (const response of stream) yield outcome(response);
  }

  /** Cancels live requests by id; returns the ids that were live. */
  async abort(requestIds: string[]): Promise<string[]> {
    const response = await this.raw.abort(create(AbortRequestSchema, { requestIds }));
    return response.abortedRequestIds;
  }

  async serverInfo(): Promise<RolloutServiceGetServerInfoResponse> {
    return this.raw.getServerInfo(create(RolloutServiceGetServerInfoRequestSchema, {}));
  }

  close(): void {
    this.channel.close();
  }
}

/** fabric.v1.RewardService: batched scoring on a reward server. */
export class RewardClient {
  private readonly channel: Channel;
  readonly raw: Client<typeof RewardService>;

  constructor(options: ConnectOptions) {
    this.channel = new Channel(options);
    this.raw = createClient(RewardService, this.channel.transport);
  }

  /** Streams score requests in; yields scores (or per-request errors) as each batch finishes. */
  async *score(requests: Requests<ScoreRequestInit>): AsyncIterable<Outcome<ScoreResponse>> {
    const messages = asAsync(requests);
    const stream = this.raw.score(
      (async function* () {
        for await (const init of messages) yield create(ScoreRequestSchema, init);
      })(),
    );
    for await (const response of stream) yield outcome(response);
  }

  async serverInfo(): Promise<RewardServiceGetServerInfoResponse> {
    return this.raw.getServerInfo(create(RewardServiceGetServerInfoRequestSchema, {}));
  }

  close(): void {
    this.channel.close();
  }
}
