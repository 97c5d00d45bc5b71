package sim

import (
	"sync/atomic"
	"time"

	"github.com/hangar-ci/hangar/internal/clock"
)

// vclock is the simulation's virtual time, moved only by the engine. The
// simulation never waits on the pool's timers: the engine steps the pool
// itself, and its clients and instances ask with a wait of 0 or a done
// context. So a timer fires at once when its duration is up already, and
// otherwise never; tickers (Run's) never tick.
type vclock struct{ now atomic.Int64 } // unix nanoseconds

var _ clock.Clock = (*vclock)(nil)

func (c *vclock) Now() time.Time { return time.Unix(0, c.now.Load()).UTC() }

func (c *vclock) set(t time.Time) { c.now.Store(t.UnixNano()) }

func (c *vclock) NewTimer(d time.Duration) clock.Timer {
	if d > 0 {
		return never{}
	}
	ch := make(chan time.Time, 1)
	ch <- c.Now()
	return fired(ch)
}

func (c *vclock) NewTicker(time.Duration) clock.Ticker { return neverTicks{} }

type neverTicks struct{}

func (neverTicks) C() <-chan time.Time { return nil }
func (neverTicks) Stop()               {}

type never struct{}

func (never) C() <-chan time.Time { return nil }
func (never) Stop() bool          { return true }

type fired chan time.Time

func (f fired) C() <-chan time.Time { return f }
func (fired) Stop() bool            { return false }
