package ec2

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsmiddleware "github.com/aws/aws-sdk-go-v2/aws/middleware"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/smithy-go/middleware"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/clock"
)

// Bucket is a token bucket: it holds at most Size tokens and gains
// PerSecond tokens a second. A zero PerSecond means no limit.
type Bucket struct {
	Size      int
	PerSecond float64
}

// RateLimits are the client-side token buckets that keep Hangar under EC2's
// own throttling, so that a burst of launches or a large pool waits here
// instead of provoking RequestLimitExceeded storms that also starve every
// other tool on the account.
//
// EC2 keeps one request bucket per API action, sized by the action's
// category, and for a few actions a second bucket counting instances
// ("resource rate limiting"). Hangar mirrors that: each action gets its own
// bucket with its category's size.
type RateLimits struct {
	RunInstances Bucket // the RunInstances request bucket
	NonMutating  Bucket // each Describe*, Get*, List* action
	Mutating     Bucket // each other action: Terminate, Stop, Start …

	// Resource buckets, in instances rather than requests.
	LaunchedInstances   Bucket // RunInstances
	TerminatedInstances Bucket // TerminateInstances
	StoppedInstances    Bucket // StopInstances
	StartedInstances    Bucket // StartInstances
}

// DefaultRateLimits are AWS's published defaults for an account ("Request
// throttling for the Amazon EC2 API", request and resource token tables).
// Accounts with raised limits, and other clouds, can pass their own.
func DefaultRateLimits() RateLimits {
	return RateLimits{
		RunInstances:        Bucket{Size: 5, PerSecond: 2},
		NonMutating:         Bucket{Size: 100, PerSecond: 20},
		Mutating:            Bucket{Size: 50, PerSecond: 5},
		LaunchedInstances:   Bucket{Size: 1000, PerSecond: 2},
		TerminatedInstances: Bucket{Size: 1000, PerSecond: 20},
		StoppedInstances:    Bucket{Size: 1000, PerSecond: 20},
		StartedInstances:    Bucket{Size: 1000, PerSecond: 2},
	}
}

// tokenBucket is a token bucket whose waiters queue in arrival order: a
// caller takes its tokens at once, going into debt if need be, and sleeps
// until the debt would have been refilled.
type tokenBucket struct {
	size, rate float64
	clock      clock.Clock

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func newTokenBucket(b Bucket, clk clock.Clock) *tokenBucket {
	return &tokenBucket{size: float64(b.Size), rate: b.PerSecond, clock: clk, tokens: float64(b.Size), last: clk.Now()}
}

// refill adds what has dripped in since the last call. Caller holds mu.
func (b *tokenBucket) refill() time.Time {
	now := b.clock.Now()
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(b.size, b.tokens+d.Seconds()*b.rate)
	}
	b.last = now
	return now
}

// reserve takes n tokens and returns how long the caller must wait before
// using them.
func (b *tokenBucket) reserve(n float64) time.Duration {
	if b == nil || b.rate <= 0 {
		return 0
	}
	// More than the bucket holds would wait forever; a full bucket is the
	// most EC2 can grant at once anyway.
	n = min(n, max(b.size, 1))
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill()
	b.tokens -= n
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// giveBack returns tokens a canceled waiter did not use.
func (b *tokenBucket) giveBack(n float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill()
	b.tokens = min(b.size, b.tokens+min(n, max(b.size, 1)))
}

// drain empties the bucket: EC2 just throttled this action, so its own
// bucket is empty and the next calls should wait for it to refill.
func (b *tokenBucket) drain() {
	if b == nil || b.rate <= 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill()
	b.tokens = min(b.tokens, 0)
}

// wait blocks until n tokens are available or ctx ends.
func (b *tokenBucket) wait(ctx context.Context, n float64) error {
	d := b.reserve(n)
	if d <= 0 {
		return nil
	}
	t := b.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return nil
	case <-ctx.Done():
		b.giveBack(n)
		return ctx.Err()
	}
}

// limiter holds the buckets, one per action, made on first use.
type limiter struct {
	limits RateLimits
	clock  clock.Clock

	mu        sync.Mutex
	requests  map[string]*tokenBucket
	resources map[string]*tokenBucket
}

func newLimiter(limits RateLimits, clk clock.Clock) *limiter {
	return &limiter{limits: limits, clock: clk, requests: map[string]*tokenBucket{}, resources: map[string]*tokenBucket{}}
}

// requestBucket returns the request bucket of an action.
func (l *limiter) requestBucket(action string) *tokenBucket {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.requests[action]
	if !ok {
		b = newTokenBucket(requestLimit(l.limits, action), l.clock)
		l.requests[action] = b
	}
	return b
}

// resourceBucket returns the resource bucket of an action, or nil.
func (l *limiter) resourceBucket(action string) *tokenBucket {
	var lim Bucket
	switch action {
	case "RunInstances":
		lim = l.limits.LaunchedInstances
	case "TerminateInstances":
		lim = l.limits.TerminatedInstances
	case "StopInstances":
		lim = l.limits.StoppedInstances
	case "StartInstances":
		lim = l.limits.StartedInstances
	default:
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.resources[action]
	if !ok {
		b = newTokenBucket(lim, l.clock)
		l.resources[action] = b
	}
	return b
}

// requestLimit is the bucket of an action's category.
func requestLimit(limits RateLimits, action string) Bucket {
	switch {
	case action == "RunInstances":
		return limits.RunInstances
	case strings.HasPrefix(action, "Describe"), strings.HasPrefix(action, "Get"),
		strings.HasPrefix(action, "List"), strings.HasPrefix(action, "Search"):
		return limits.NonMutating
	default:
		return limits.Mutating
	}
}

// tokens is what the bucket holds now, debt negative.
func (b *tokenBucket) available() float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill()
	return b.tokens
}

// headroomWindow is how long a launch may wait on the instance bucket
// before it is too big: LaunchHeadroom counts its refill.
const headroomWindow = 60 * time.Second

// LaunchHeadroom is how many instances launches can start now without
// waiting more than a minute on the client's instance bucket (AWS's
// resource rate limit for RunInstances): its tokens plus a minute of
// refill. A pool sizes its batches by it, so that after a burst of 1,000
// instances batches shrink instead of timing out in the wait. Without an
// instance bucket it is math.MaxInt32.
func (p *Provider) LaunchHeadroom() int {
	b := p.limits.resourceBucket("RunInstances")
	if b == nil || b.rate <= 0 {
		return math.MaxInt32
	}
	return max(0, int(b.available()+headroomWindow.Seconds()*b.rate))
}

// resourceCost is how many instances a call acts on, for the resource
// buckets.
func resourceCost(params any) int {
	switch in := params.(type) {
	case *ec2.RunInstancesInput:
		if in.MaxCount != nil {
			return int(*in.MaxCount)
		}
	case *ec2.TerminateInstancesInput:
		return len(in.InstanceIds)
	case *ec2.StopInstancesInput:
		return len(in.InstanceIds)
	case *ec2.StartInstancesInput:
		return len(in.InstanceIds)
	}
	return 1
}

// resourceLimit waits on the resource bucket once per call: EC2 charges
// instances only for a request it carries out, not for each attempt.
type resourceLimit struct{ l *limiter }

func (resourceLimit) ID() string { return "HangarResourceLimit" }

func (m resourceLimit) HandleInitialize(ctx context.Context, in middleware.InitializeInput, next middleware.InitializeHandler) (middleware.InitializeOutput, middleware.Metadata, error) {
	action := awsmiddleware.GetOperationName(ctx)
	b := m.l.resourceBucket(action)
	if b == nil {
		return next.HandleInitialize(ctx, in)
	}
	cost := float64(resourceCost(in.Parameters))
	if err := b.wait(ctx, cost); err != nil {
		return middleware.InitializeOutput{}, middleware.Metadata{}, waitCanceled("instance", action, err)
	}
	out, md, err := next.HandleInitialize(ctx, in)
	switch res, _ := out.Result.(*ec2.RunInstancesOutput); {
	case errorCode(err) != "":
		// EC2 answered no: it acted on no instance, so it charged none.
		// (After an error without an answer it may have.)
		b.giveBack(cost)
	case err == nil && res != nil && float64(len(res.Instances)) < cost:
		// A launch that started short was charged what it started.
		b.giveBack(cost - float64(len(res.Instances)))
	}
	return out, md, err
}

// requestLimitObserve waits on the request bucket before every attempt,
// retries included (EC2 counts each), and reports each attempt to
// observe. It sits right after the SDK's retry middleware and before
// signing, so that a long wait cannot age the signature.
type requestLimitObserve struct {
	l       *limiter
	observe func(action, code string, d time.Duration)
}

func (requestLimitObserve) ID() string { return "HangarRequestLimit" }

func (m requestLimitObserve) HandleFinalize(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
	action := awsmiddleware.GetOperationName(ctx)
	b := m.l.requestBucket(action)
	if err := b.wait(ctx, 1); err != nil {
		return middleware.FinalizeOutput{}, middleware.Metadata{}, waitCanceled("request", action, err)
	}
	// Latency is the cloud's, on the wall clock; it decides nothing.
	start := time.Now()
	out, md, err := next.HandleFinalize(ctx, in)
	code := requestCode(err)
	if errors.Is(classOf(code), cloud.ErrThrottled) {
		b.drain()
	}
	if m.observe != nil {
		m.observe(action, code, time.Since(start))
	}
	return out, md, err
}

// waitCanceled reports a wait for a token that the context ended, as the
// SDK's cancellation error so that its retryer does not count it as a
// timeout to retry, and keeps saying what was waited for.
func waitCanceled(bucket, action string, err error) error {
	return &aws.RequestCanceledError{Err: fmt.Errorf("waiting for the %s %s rate limit: %w", action, bucket, err)}
}

// addMiddleware puts the limits and the observer on an EC2 client's stack.
func addMiddleware(l *limiter, observe func(action, code string, d time.Duration)) func(*middleware.Stack) error {
	return func(s *middleware.Stack) error {
		if err := s.Initialize.Add(resourceLimit{l}, middleware.After); err != nil {
			return err
		}
		if _, ok := s.Finalize.Get("Retry"); !ok {
			// A presigning stack (CopySnapshot's PresignedUrl for the source
			// region) has no retry step: it signs a URL and sends nothing,
			// so there is no request to pace or observe.
			return nil
		}
		return s.Finalize.Insert(requestLimitObserve{l: l, observe: observe}, "Retry", middleware.After)
	}
}
