// Command fabric-example streams Generate requests to a rollout server, scores every sample with Score on a
// reward server, and prints one JSON line per event. The TypeScript and C++ examples take the same flags and
// print the same lines.
//
//	fabric-example --rollout HOST:PORT --reward HOST:PORT [--prompt P --ground-truth G]...
//	    [--max-new-tokens N] [--n N] [--temperature T] [--reward-name math] [--token T] [--ca-file F]
//	    [--timeout-s S] [--bad-request]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"fabric/clients/go/fabric"
	fabricv1 "fabric/clients/go/gen/fabric/v1"
)

type repeated []string

func (r *repeated) String() string     { return strings.Join(*r, ",") }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

func emit(event string, fields map[string]any) {
	fields["event"] = event
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
}

func printError(event, rpc, requestID string, err error) {
	fields := map[string]any{"rpc": rpc, "code": int(status.Code(err)), "message": status.Convert(err).Message()}
	if requestID != "" {
		fields["request_id"] = requestID
	}
	emit(event, fields)
}

func taskIndex(requestID string) int {
	i, _ := strconv.Atoi(requestID[strings.Index(requestID, "-")+1:])
	return i
}

func run() error {
	var prompts, truths repeated
	rolloutAddr := flag.String("rollout", "", "rollout server HOST:PORT")
	rewardAddr := flag.String("reward", "", "reward server HOST:PORT")
	flag.Var(&prompts, "prompt", "a prompt (repeatable, paired with --ground-truth)")
	flag.Var(&truths, "ground-truth", "the ground truth of the prompt at the same position")
	maxNewTokens := flag.Int("max-new-tokens", 16, "tokens per sample at most")
	n := flag.Int("n", 1, "samples per prompt")
	temperature := flag.Float64("temperature", 0, "sampling temperature (0: greedy)")
	rewardName := flag.String("reward-name", "math", "a key of the reward server's `rewards` config")
	token := flag.String("token", "", "bearer token")
	caFile := flag.String("ca-file", "", "PEM CA bundle: use TLS")
	timeoutS := flag.Float64("timeout-s", 0, "deadline of each call in seconds (0: none)")
	badRequest := flag.Bool("bad-request", false, "also send a request the server must refuse, and a bad Abort")
	flag.Parse()
	if *rolloutAddr == "" || *rewardAddr == "" {
		return status.Error(codes.InvalidArgument, "--rollout HOST:PORT and --reward HOST:PORT are required")
	}
	if len(prompts) == 0 && len(truths) == 0 {
		prompts, truths = repeated{"Add 3 and 4.\n", "Add 12 and 30.\n"}, repeated{"7", "42"}
	}
	if len(prompts) != len(truths) {
		return status.Error(codes.InvalidArgument, "give one --ground-truth per --prompt")
	}
	common := fabric.Options{Token: *token, CAFile: *caFile, Timeout: time.Duration(*timeoutS * float64(time.Second))}
	rolloutOpts, rewardOpts := common, common
	rolloutOpts.Address, rewardOpts.Address = *rolloutAddr, *rewardAddr
	rollout, err := fabric.NewRolloutClient(rolloutOpts)
	if err != nil {
		return err
	}
	defer rollout.Close()
	reward, err := fabric.NewRewardClient(rewardOpts)
	if err != nil {
		return err
	}
	defer reward.Close()
	ctx := context.Background()

	var requests []*fabricv1.GenerateRequest
	for i, prompt := range prompts {
		requests = append(requests, &fabricv1.GenerateRequest{
			RequestId: fmt.Sprintf("task-%d", i),
			Prompt:    prompt,
			Sampling: &fabricv1.SamplingParams{
				MaxNewTokens:       proto.Int32(int32(*maxNewTokens)),
				NumReturnSequences: proto.Int32(int32(*n)),
				Temperature:        proto.Float32(float32(*temperature)),
			},
		})
	}
	if *badRequest {
		// Neither prompt nor prompt_token_ids: the server refuses this item alone and the stream goes on.
		requests = append(requests, &fabricv1.GenerateRequest{RequestId: "bad-0"})
	}

	var samples []*fabricv1.GenerateResponse
	errorCount := 0
	err = rollout.Generate(ctx, requests, func(item fabric.Outcome[*fabricv1.GenerateResponse]) {
		if item.Err != nil {
			errorCount++
			printError("error", "Generate", item.RequestID, item.Err)
			return
		}
		samples = append(samples, item.Value)
	})
	if err != nil {
		return err
	}

	key := func(s *fabricv1.GenerateResponse) string { return fmt.Sprintf("%s/%d", s.RequestId, s.SampleIndex) }
	var scoreRequests []*fabricv1.ScoreRequest
	for _, s := range samples {
		scoreRequests = append(scoreRequests, &fabricv1.ScoreRequest{
			RequestId:        key(s),
			Prompt:           prompts[taskIndex(s.RequestId)],
			Response:         s.Text,
			GroundTruth:      truths[taskIndex(s.RequestId)],
			RewardName:       *rewardName,
			ResponseTokenIds: s.TokenIds,
		})
	}
	scores := map[string]float32{}
	err = reward.Score(ctx, scoreRequests, func(item fabric.Outcome[*fabricv1.ScoreResponse]) {
		if item.Err != nil {
			errorCount++
			printError("error", "Score", item.RequestID, item.Err)
			return
		}
		scores[item.RequestID] = item.Value.Score
	})
	if err != nil {
		return err
	}

	sort.Slice(samples, func(i, j int) bool { return key(samples[i]) < key(samples[j]) })
	for _, s := range samples {
		var score any
		if value, ok := scores[key(s)]; ok {
			score = value
		}
		tokenIDs := s.TokenIds
		if tokenIDs == nil {
			tokenIDs = []int32{}
		}
		emit("sample", map[string]any{
			"request_id":     s.RequestId,
			"sample_index":   s.SampleIndex,
			"token_ids":      tokenIDs,
			"text":           s.Text,
			"finish_reason":  strings.TrimPrefix(s.FinishReason.String(), "FINISH_REASON_"),
			"weight_version": s.WeightVersion,
			"score":          score,
		})
	}

	if *badRequest {
		// A call-level error: Abort needs at least one id, so the server answers INVALID_ARGUMENT.
		if _, err := rollout.Abort(ctx, nil); err != nil {
			printError("call_error", "Abort", "", err)
		}
	}
	emit("summary", map[string]any{"samples": len(samples), "scored": len(scores), "errors": errorCount})
	return nil
}

func main() {
	if err := run(); err != nil {
		// status.Convert gives any error a code: its own for gRPC errors, UNKNOWN for the rest.
		emit("fatal", map[string]any{"code": int(status.Code(err)), "message": status.Convert(err).Message()})
		os.Exit(1)
	}
}
