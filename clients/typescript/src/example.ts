// Streams Generate requests to a rollout server, scores every sample with Score on a reward server, and prints
// one JSON line per event. The C++ and Go examples take the same flags and print the same lines.
//
//   node dist/example.js --rollout HOST:PORT --reward HOST:PORT [--prompt P --ground-truth G]...
//       [--max-new-tokens N] [--n N] [--temperature T] [--reward-name math] [--token T] [--ca-file F]
//       [--timeout-s S] [--bad-request]
import { parseArgs } from "node:util";
import { ConnectError } from "@connectrpc/connect";
import {
  FinishReason,
  RewardClient,
  RolloutClient,
  type GenerateRequestInit,
  type GenerateResponse,
} from "./index.js";

const { values: args } = parseArgs({
  options: {
    rollout: { type: "string" },
    reward: { type: "string" },
    prompt: { type: "string", multiple: true },
    "ground-truth": { type: "string", multiple: true },
    "max-new-tokens": { type: "string", default: "16" },
    n: { type: "string", default: "1" },
    temperature: { type: "string", default: "0" },
    "reward-name": { type: "string", default: "math" },
    token: { type: "string" },
    "ca-file": { type: "string" },
    "timeout-s": { type: "string" },
    "bad-request": { type: "boolean", default: false },
  },
});

const print = (event: string, fields: object) => console.log(JSON.stringify({ event, ...fields }));
const printItemError = (rpc: string, requestId: string, error: ConnectError) =>
  print("error", { rpc, request_id: requestId, code: error.code, message: error.rawMessage });

async function main(): Promise<number> {
  if (!args.rollout || !args.reward) throw new Error("--rollout HOST:PORT and --reward HOST:PORT are required");
  const prompts = args.prompt ?? ["Add 3 and 4.\n", "Add 12 and 30.\n"];
  const truths = args["ground-truth"] ?? (args.prompt ? [] : ["7", "42"]);
  if (truths.length !== prompts.length) throw new Error("give one --ground-truth per --prompt");
  const common = {
    token: args.token,
    caFile: args["ca-file"],
    timeoutMs: args["timeout-s"] ? Number(args["timeout-s"]) * 1000 : undefined,
  };
  const rollout = new RolloutClient({ address: args.rollout, ...common });
  const reward = new RewardClient({ address: args.reward, ...common });
  try {
    const requests: GenerateRequestInit[] = prompts.map((prompt, i) => ({
      requestId: `task-${i}`,
      prompt,
      sampling: {
        maxNewTokens: Number(args["max-new-tokens"]),
        numReturnSequences: Number(args.n),
        temperature: Number(args.temperature),
      },
    }));
    // Neither prompt nor prompt_token_ids: the server refuses this item alone and the stream goes on.
    if (args["bad-request"]) requests.push({ requestId: "bad-0" });

    const samples: GenerateResponse[] = [];
    let errors = 0;
    for await (const item of rollout.generate(requests)) {
      if (item.error) {
        errors++;
        printItemError("Generate", item.requestId, item.error);
      } else {
        samples.push(item.value);
      }
    }

    const key = (s: GenerateResponse) => `${s.requestId}/${s.sampleIndex}`;
    const truthOf = (requestId: string) => truths[Number(requestId.split("-")[1])];
    const scores = new Map<string, number>();
    const scoreRequests = samples.map((s) => ({
      requestId: key(s),
      prompt: prompts[Number(s.requestId.split("-")[1])],
      response: s.text,
      groundTruth: truthOf(s.requestId),
      rewardName: args["reward-name"],
      responseTokenIds: s.tokenIds,
    }));
    for await (const item of reward.score(scoreRequests)) {
      if (item.error) {
        errors++;
        printItemError("Score", item.requestId, item.error);
      } else {
        scores.set(item.requestId, item.value.score);
      }
    }

    samples.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
    for (const s of samples) {
      print("sample", {
        request_id: s.requestId,
        sample_index: s.sampleIndex,
        token_ids: s.tokenIds,
        text: s.text,
        finish_reason: FinishReason[s.finishReason],
        weight_version: Number(s.weightVersion),
        score: scores.get(key(s)) ?? null,
      });
    }

    if (args["bad-request"]) {
      // A call-level error: Abort needs at least one id, so the server answers INVALID_ARGUMENT.
      try {
        await rollout.abort([]);
      } catch (err) {
        const e = ConnectError.from(err);
        print("call_error", { rpc: "Abort", code: e.code, message: e.rawMessage });
      }
    }
    print("summary", { samples: samples.length, scored: scores.size, errors });
    return 0;
  } finally {
    rollout.close();
    reward.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    const e = ConnectError.from(err);
    print("fatal", { code: e.code, message: e.rawMessage });
    process.exit(1);
  },
);
