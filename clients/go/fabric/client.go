// Package fabric is a small typed wrapper over the generated fabric.v1 stubs (gen/fabric/v1, never edited by
// hand). It adds what every caller needs: a deadline, a bearer token, TLS from a CA file, and per-item stream
// errors turned into a gRPC status error (status.Code(err) works on them), the native error type of grpc-go.
package fabric

import (
	"context"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	fabricv1 "fabric/clients/go/gen/fabric/v1"
)

const maxMessageBytes = 64 * 1024 * 1024 // as the Python servers allow

// Options say where and how to connect.
type Options struct {
	Address string        // host:port
	Token   string        // sent as `authorization: Bearer <token>` when not empty
	CAFile  string        // PEM CA bundle: TLS, verifying the server against it; plaintext when empty
	Timeout time.Duration // deadline of every call (a whole stream is one call); none when 0
}

// ItemError is one refused item of a stream (the response's `error` field); the stream itself went on.
type ItemError struct {
	RequestID string
	Code      codes.Code
	Message   string
	Reason    string
	Field     string
}

func (e *ItemError) Error() string {
	return fmt.Sprintf("request %s: %s: %s", e.RequestID, e.Code, e.Message)
}

// GRPCStatus lets status.Code(err) and status.FromError(err) read an ItemError like any gRPC error.
func (e *ItemError) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

// Outcome is what a stream yields per response: a value, or the error that refused its request.
type Outcome[T any] struct {
	RequestID string
	Value     T
	Err       *ItemError
}

type bearerToken string

func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// Plaintext is allowed too, so a token works on a trusted network without TLS, as in the other clients.
func (t bearerToken) RequireTransportSecurity() bool { return false }

// Dial opens a channel (plaintext, or TLS when a CA file is given).
func Dial(opts Options) (*grpc.ClientConn, error) {
	dialOpts := []grpc.DialOption{grpc.WithDefaultCallOptions(
		grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes))}
	if opts.CAFile == "" {
		dialOpts = append(dialOpts, grpc.WithInsecure())
	} else {
		creds, err := credentials.NewClientTLSFromFile(opts.CAFile, "")
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "ca_file: %v", err)
		}
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(creds))
	}
	if opts.Token != "" {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearerToken(opts.Token)))
	}
	return grpc.Dial(opts.Address, dialOpts...)
}

func withDeadline(ctx context.Context, opts Options) (context.Context, context.CancelFunc) {
	if opts.Timeout > 0 {
		return context.WithTimeout(ctx, opts.Timeout)
	}
	return context.WithCancel(ctx)
}

type bidiStream[Req any, Resp any] interface {
	Send(Req) error
	Recv() (Resp, error)
	CloseSend() error
}

// runStream sends every request from a goroutine while reading responses as they come, on one bidi call.
func runStream[Req any, Resp interface {
	GetRequestId() string
	GetError() *fabricv1.Error
}](stream bidiStream[Req, Resp], requests []Req, onItem func(Outcome[Resp])) error {
	go func() {
		for _, request := range requests {
			if stream.Send(request) != nil {
				return // the call ended; Recv reports why
			}
		}
		stream.CloseSend()
	}()
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		outcome := Outcome[Resp]{RequestID: response.GetRequestId(), Value: response}
		if e := response.GetError(); e != nil {
			outcome.Err = &ItemError{RequestID: response.GetRequestId(), Code: codes.Code(e.Code), Message: e.Message,
				Reason: e.Reason, Field: e.Field}
		}
		onItem(outcome)
	}
}

// RolloutClient calls fabric.v1.RolloutService.
type RolloutClient struct {
	conn *grpc.ClientConn
	opts Options
	Raw  fabricv1.RolloutServiceClient
}

func NewRolloutClient(opts Options) (*RolloutClient, error) {
	conn, err := Dial(opts)
	if err != nil {
		return nil, err
	}
	return &RolloutClient{conn: conn, opts: opts, Raw: fabricv1.NewRolloutServiceClient(conn)}, nil
}

// Generate streams the requests in on one call; onItem gets each sample or refused request in completion order.
// The error is the call's own (deadline, auth, server gone), as a gRPC status error.
func (c *RolloutClient) Generate(ctx context.Context, requests []*fabricv1.GenerateRequest,
	onItem func(Outcome[*fabricv1.GenerateResponse])) error {
	ctx, cancel := withDeadline(ctx, c.opts)
	defer cancel()
	stream, err := c.Raw.Generate(ctx)
	if err != nil {
		return err
	}
	return runStream[*fabricv1.GenerateRequest, *fabricv1.GenerateResponse](stream, requests, onItem)
}

// Abort cancels live requests by id and returns the ids that were live.
func (c *RolloutClient) Abort(ctx context.Context, requestIDs []string) ([]string, error) {
	ctx, cancel := withDeadline(ctx, c.opts)
	defer cancel()
	response, err := c.Raw.Abort(ctx, &fabricv1.AbortRequest{RequestIds: requestIDs})
	if err != nil {
		return nil, err
	}
	return response.AbortedRequestIds, nil
}

func (c *RolloutClient) ServerInfo(ctx context.Context) (*fabricv1.RolloutServiceGetServerInfoResponse, error) {
	ctx, cancel := withDeadline(ctx, c.opts)
	defer cancel()
	return c.Raw.GetServerInfo(ctx, &fabricv1.RolloutServiceGetServerInfoRequest{})
}

func (c *RolloutClient) Close() error { return c.conn.Close() }

// RewardClient calls fabric.v1.RewardService.
type RewardClient struct {
	conn *grpc.ClientConn
	opts Options
	Raw  fabricv1.RewardServiceClient
}

func NewRewardClient(opts Options) (*RewardClient, error) {
	conn, err := Dial(opts)
	if err != nil {
		return nil, err
	}
	return &RewardClient{conn: conn, opts: opts, Raw: fabricv1.NewRewardServiceClient(conn)}, nil
}

// Score streams the requests in on one call; onItem gets each score or refused request as batches finish.
func (c *RewardClient) Score(ctx context.Context, requests []*fabricv1.ScoreRequest,
	onItem func(Outcome[*fabricv1.ScoreResponse])) error {
	ctx, cancel := withDeadline(ctx, c.opts)
	defer cancel()
	stream, err := c.Raw.Score(ctx)
	if err != nil {
		return err
	}
	return runStream[*fabricv1.ScoreRequest, *fabricv1.ScoreResponse](stream, requests, onItem)
}

func (c *RewardClient) ServerInfo(ctx context.Context) (*fabricv1.RewardServiceGetServerInfoResponse, error) {
	ctx, cancel := withDeadline(ctx, c.opts)
	defer cancel()
	return c.Raw.GetServerInfo(ctx, &fabricv1.RewardServiceGetServerInfoRequest{})
}

func (c *RewardClient) Close() error { return c.conn.Close() }
