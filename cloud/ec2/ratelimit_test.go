package ec2

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/clock"
	"github.com/hangar-ci/hangar/internal/testutil"
)

func TestTokenBucketReserve(t *testing.T) {
	fake := testutil.NewFakeClock()
	b := newTokenBucket(Bucket{Size: 5, PerSecond: 2}, fake)
	// The full bucket lets a burst of five through at once.
	for i := range 5 {
		if d := b.reserve(1); d != 0 {
			t.Fatalf("request %d of the burst waits %s, want 0", i+1, d)
		}
	}
	// Then requests queue: each waits for its own token, half a second apart.
	for i, want := range []time.Duration{500 * time.Millisecond, time.Second, 1500 * time.Millisecond} {
		if d := b.reserve(1); d != want {
			t.Errorf("request %d after the burst waits %s, want %s", i+1, d, want)
		}
	}
	// Time pays the debt back, and refills no further than the size.
	fake.Advance(time.Hour)
	for i := range 5 {
		if d := b.reserve(1); d != 0 {
			t.Fatalf("after an hour, request %d waits %s, want 0", i+1, d)
		}
	}
	if d := b.reserve(1); d != 500*time.Millisecond {
		t.Errorf("sixth request after an hour waits %s, want 500ms (bucket holds 5)", d)
	}
}

func TestTokenBucketLargeCostAndDrain(t *testing.T) {
	fake := testutil.NewFakeClock()
	b := newTokenBucket(Bucket{Size: 1000, PerSecond: 20}, fake)
	// 2500 instances cost at most a full bucket, so a big batch can go
	// once the bucket is full instead of never.
	if d := b.reserve(2500); d != 0 {
		t.Errorf("reserve(2500) on a full bucket of 1000 waits %s, want 0", d)
	}
	if d := b.reserve(20); d != time.Second {
		t.Errorf("reserve(20) on an empty bucket refilling 20/s waits %s, want 1s", d)
	}

	fake.Advance(time.Hour)
	b.drain()
	if d := b.reserve(1); d != 50*time.Millisecond {
		t.Errorf("after drain, reserve(1) waits %s, want 50ms", d)
	}
}

func TestTokenBucketUnlimited(t *testing.T) {
	b := newTokenBucket(Bucket{}, clock.Real)
	for range 10000 {
		if d := b.reserve(1); d != 0 {
			t.Fatalf("a bucket without rate waits %s", d)
		}
	}
	b.drain() // must not start limiting
	if d := b.reserve(1); d != 0 {
		t.Fatalf("a drained bucket without rate waits %s", d)
	}
}

func TestTokenBucketWaitCanceled(t *testing.T) {
	b := newTokenBucket(Bucket{Size: 1, PerSecond: 1}, clock.Real)
	if err := b.wait(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := b.wait(ctx, 1)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait on an empty bucket with a 20ms deadline: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("canceled wait returned after %s, want about 20ms", d)
	}
	// The canceled waiter gave its token back: the next one waits for one
	// token's refill, not two.
	if d := b.reserve(1); d > time.Second {
		t.Errorf("after a canceled wait the next waits %s, want at most 1s", d)
	}
}

func TestTokenBucketWaitPaces(t *testing.T) {
	b := newTokenBucket(Bucket{Size: 2, PerSecond: 50}, clock.Real)
	start := time.Now()
	for range 12 { // 2 at once, then 10 at 20ms each
		if err := b.wait(context.Background(), 1); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(start); d < 180*time.Millisecond {
		t.Errorf("12 requests through a bucket of 2 refilling 50/s took %s, want at least 200ms", d)
	}
}

func TestRequestLimitCategories(t *testing.T) {
	limits := DefaultRateLimits()
	for action, want := range map[string]Bucket{
		"RunInstances":       {Size: 5, PerSecond: 2},
		"DescribeInstances":  {Size: 100, PerSecond: 20},
		"DescribeImages":     {Size: 100, PerSecond: 20},
		"GetConsoleOutput":   {Size: 100, PerSecond: 20},
		"TerminateInstances": {Size: 50, PerSecond: 5},
		"StopInstances":      {Size: 50, PerSecond: 5},
		"StartInstances":     {Size: 50, PerSecond: 5},
		"CreateTags":         {Size: 50, PerSecond: 5},
	} {
		if got := requestLimit(limits, action); got != want {
			t.Errorf("requestLimit(%s) = %+v, want %+v", action, got, want)
		}
	}
	l := newLimiter(limits, clock.Real)
	if l.requestBucket("DescribeInstances") == l.requestBucket("DescribeImages") {
		t.Error("DescribeInstances and DescribeImages share a bucket; EC2 keeps one per action")
	}
	if first := l.requestBucket("DescribeInstances"); l.requestBucket("DescribeInstances") != first {
		t.Error("one action got two buckets")
	}
	if l.resourceBucket("DescribeInstances") != nil {
		t.Error("DescribeInstances has a resource bucket; EC2 has none for it")
	}
	if b := l.resourceBucket("RunInstances"); b == nil || b.size != 1000 || b.rate != 2 {
		t.Errorf("RunInstances resource bucket = %+v, want 1000 refilling 2/s", b)
	}
}
