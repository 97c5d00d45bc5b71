package testutil

import (
	"testing"
	"time"
)

func fired(c <-chan time.Time) (time.Time, bool) {
	select {
	case t := <-c:
		return t, true
	default:
		return time.Time{}, false
	}
}

func TestFakeClock(t *testing.T) {
	c := NewFakeClock()
	start := c.Now()
	now := c.NewTimer(0)
	if _, ok := fired(now.C()); !ok {
		t.Fatal("a timer of 0 did not fire at once")
	}
	late, early := c.NewTimer(2*time.Second), c.NewTimer(time.Second)
	stopped := c.NewTimer(time.Second)
	if !stopped.Stop() || stopped.Stop() {
		t.Fatal("Stop of a waiting timer: want true, then false")
	}
	tick := c.NewTicker(700 * time.Millisecond)
	c.Advance(999 * time.Millisecond)
	if _, ok := fired(early.C()); ok {
		t.Fatal("a timer fired early")
	}
	if at, ok := fired(tick.C()); !ok || !at.Equal(start.Add(700*time.Millisecond)) {
		t.Fatalf("ticker: fired %v at %s", ok, at)
	}
	c.Advance(time.Second)
	if at, ok := fired(early.C()); !ok || !at.Equal(start.Add(time.Second)) {
		t.Fatalf("1s timer: fired %v at %s", ok, at)
	}
	if at, ok := fired(late.C()); ok {
		t.Fatalf("2s timer fired at %s, 1.999s in", at)
	}
	if _, ok := fired(stopped.C()); ok {
		t.Fatal("a stopped timer fired")
	}
	if at, ok := fired(tick.C()); !ok || !at.Equal(start.Add(1400*time.Millisecond)) {
		t.Fatalf("ticker, second tick: fired %v at %s (an unread tick is dropped)", ok, at)
	}
	c.Advance(time.Millisecond)
	if _, ok := fired(late.C()); !ok {
		t.Fatal("2s timer did not fire at 2s")
	}
	if got := c.Now().Sub(start); got != 2*time.Second {
		t.Fatalf("clock moved %s, want 2s", got)
	}
	tick.Stop()
	if c.Waiters() != 0 {
		t.Fatalf("%d waiters left", c.Waiters())
	}
}
