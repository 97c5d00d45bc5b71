package pool

import (
	"encoding/json"
	"math"
	"slices"
	"testing"
	"time"
)

// t0 is a Monday 09:00 UTC, on a minute and a ten-minute boundary.
var t0 = time.Date(2026, 3, 2, 9, 0, 0, 0, time.UTC)

func TestCountRing(t *testing.T) {
	r := newCountRing(time.Minute, 5, t0)
	r.add(t0)
	r.add(t0.Add(30 * time.Second))
	r.add(t0.Add(time.Minute))
	r.add(t0.Add(-time.Minute)) // late, but within the ring
	r.add(t0.Add(-10 * time.Minute))
	i := r.index(t0)
	if got := r.sum(i-1, i+1); got != 4 {
		t.Errorf("sum around t0 = %d, want 4 (the one 10 minutes before is older than the ring)", got)
	}
	if got := r.sum(i, i); got != 2 {
		t.Errorf("sum of t0's minute = %d, want 2", got)
	}
	// Five buckets: with i+4 the newest, t0's is the oldest kept.
	r.advance(i + 4)
	if got := r.sum(i-10, i+10); got != 3 {
		t.Errorf("at t0+4m, sum = %d, want 3 (t0's and t0+1m's)", got)
	}
	r.advance(i + 5)
	if got := r.sum(i-10, i+10); got != 1 {
		t.Errorf("at t0+5m, sum = %d, want 1 (t0+1m's)", got)
	}
	r.advance(i + 100)
	if got := r.sum(i-200, i+200); got != 0 {
		t.Errorf("after 100 minutes, sum = %d, want 0", got)
	}
	// Times before 1970 index down, not toward zero.
	if got := r.index(time.Unix(-1, 0)); got != -1 {
		t.Errorf("index of 1969-12-31T23:59:59 = %d, want -1", got)
	}
}

func TestRecentRateAndPushes(t *testing.T) {
	d := newDemand(t0)
	// Two hours of 3 a minute, evenly spread.
	for m := range 120 {
		for k := range 3 {
			d.arrival(t0.Add(time.Duration(m)*time.Minute + time.Duration(k)*20*time.Second))
		}
	}
	now := t0.Add(120 * time.Minute)
	if got := d.recentRate(now) * 60; math.Abs(got-3) > 0.01 {
		t.Errorf("steady 3/min: recent rate %.3f/min", got)
	}
	if b := d.batches(); len(b) != pushSamples+1 || slices.Max(b) != 1 {
		t.Errorf("steady 3/min, 20s apart: pushes %v, want the last %d and the one under way, of 1 each", b, pushSamples)
	}
	// Then a burst of 30 in one minute: the short window sees it at once.
	for range 30 {
		d.arrival(now.Add(10 * time.Second))
	}
	now = now.Add(time.Minute)
	if got := d.recentRate(now) * 60; got < 6 {
		t.Errorf("after a burst of 30: recent rate %.2f/min, want the 5-minute window's (≥ 6)", got)
	}
	if b := d.batches(); len(b) != pushSamples+1 || b[len(b)-1] != 30 || b[len(b)-2] != 1 {
		t.Errorf("after a burst of 30: pushes end %v, want …, 1, 30", b[len(b)-3:])
	}
	// Requests 10s apart are one push; 11s apart, two.
	d.arrival(now)
	d.arrival(now.Add(10 * time.Second))
	d.arrival(now.Add(21 * time.Second))
	if b := d.batches(); b[len(b)-3] != 30 || b[len(b)-2] != 2 || b[len(b)-1] != 1 {
		t.Errorf("pushes end %v, want 30, 2, 1", b[len(b)-3:])
	}
	// Silence: the long window forgets the burst over half an hour.
	later := now.Add(25 * time.Minute)
	if got := d.recentRate(later) * 60; got <= 0 || got > 2 {
		t.Errorf("25 minutes of silence: rate %.2f/min, want the burst's trace in the half hour (0, 2]", got)
	}
	if got := d.recentRate(now.Add(40 * time.Minute)); got != 0 {
		t.Errorf("40 minutes of silence: rate %.3f/s, want 0", got)
	}
}

// A young history is not diluted by time before it began.
func TestRecentRateOfAYoungHistory(t *testing.T) {
	d := newDemand(t0)
	for k := range 4 {
		d.arrival(t0.Add(time.Duration(k) * 30 * time.Second))
	}
	if got := d.recentRate(t0.Add(2*time.Minute)) * 60; math.Abs(got-2) > 0.01 {
		t.Errorf("4 requests in the first 2 minutes: %.3f/min, want 2", got)
	}
}

// Before the pool knows its quiets it plans for its rate since its history
// began, over at most the days the history keeps.
func TestRateSinceStart(t *testing.T) {
	d := newDemand(t0)
	for k := range 60 {
		d.arrival(t0.Add(time.Duration(k) * time.Minute))
	}
	if got := d.rateSinceStart(t0.Add(2*time.Hour)) * 60; math.Abs(got-0.5) > 1e-9 {
		t.Errorf("60 requests in 2 hours: %.3f/min, want 0.5", got)
	}
	young := newDemand(t0)
	young.arrival(t0)
	if got := young.rateSinceStart(t0.Add(10 * time.Second)); got != 1.0/60 {
		t.Errorf("1 request in 10 seconds: %v/s, want it over a minute at least", got)
	}
	// Nine days on, the first day's requests have left the history.
	d.arrival(t0.Add(9 * 24 * time.Hour))
	span := time.Duration(historyBuckets-1)*bucketWidth + 5*time.Minute
	if got, want := d.rateSinceStart(t0.Add(9*24*time.Hour+5*time.Minute)), 1/span.Seconds(); math.Abs(got-want) > 1e-12 {
		t.Errorf("nine days on: %v/s, want one request over the history's %s", got, span)
	}
}

func TestHistoryRate(t *testing.T) {
	d := newDemand(t0.Add(-time.Hour))
	// A rush of 60 a minute every day from 09:00 to 09:30, quiet otherwise.
	rush := func(day int) {
		for m := range 30 {
			for range 60 {
				d.arrival(t0.Add(time.Duration(day)*24*time.Hour + time.Duration(m)*time.Minute))
			}
		}
	}
	rush(0)
	if got := d.historyRate(t0.Add(12 * time.Hour)); got != 0 {
		t.Errorf("half a day in: history rate %v, want none yet", got)
	}
	// The next day at 08:50, the window 08:40–09:10 of the day before holds
	// ten minutes of the rush: 600 requests in 30 minutes.
	if got := d.historyRate(t0.Add(24*time.Hour-10*time.Minute)) * 60; math.Abs(got-20) > 0.01 {
		t.Errorf("a day in, 08:50: %.2f/min, want 20 (yesterday's rush ahead)", got)
	}
	rush(1)
	// At 12:00 nothing happened then yesterday.
	if got := d.historyRate(t0.Add(27 * time.Hour)); got != 0 {
		t.Errorf("a day in, 12:00: %v, want 0", got)
	}
	for day := 2; day < 7; day++ {
		rush(day)
	}
	// Seven days in, last week's day is read: day 0's rush, not day 6's
	// (which had none at 12:00 either).
	if got := d.historyRate(t0.Add(7*24*time.Hour-10*time.Minute)) * 60; math.Abs(got-20) > 0.01 {
		t.Errorf("seven days in, 08:50: %.2f/min, want 20", got)
	}
	rush(7)
	// A week and a day in: day 1's, still in the ring.
	if got := d.historyRate(t0.Add(8*24*time.Hour-10*time.Minute)) * 60; math.Abs(got-20) > 0.01 {
		t.Errorf("eight days in, 08:50: %.2f/min, want 20", got)
	}
}

// activeFor reads the quiets before the latest pushes: the spares are kept
// long enough after a request that only share of the requests came after
// a longer quiet.
func TestActiveFor(t *testing.T) {
	// pushes plays pushes of the given sizes (requests a second apart)
	// after the given quiets, from the latest request of the one before.
	pushes := func(quiets []time.Duration, sizes []int) *demand {
		d := newDemand(t0)
		at := t0
		for i, q := range quiets {
			at = at.Add(q)
			for k := range sizes[i] {
				if k > 0 {
					at = at.Add(time.Second)
				}
				d.arrival(at)
			}
		}
		return d
	}
	// 20 pushes of 5 after quiets of 1..20 minutes; the first push's quiet
	// (from nothing) is not one. 95 requests came after a quiet.
	quiets := make([]time.Duration, 21)
	sizes := make([]int, 21)
	for i := range quiets {
		quiets[i], sizes[i] = time.Duration(i)*time.Minute, 5
	}
	d := pushes(quiets, sizes)
	if n := len(d.Gaps); n != 19 || d.Gaps[0] != (gapSample{60, 5}) || d.OpenGapS != 1200 || d.Open != 5 {
		t.Fatalf("gaps %v, open %d after %vs; want 19 closed from 60s, the last of 5 after 1200s", d.Gaps, d.Open, d.OpenGapS)
	}
	for _, tc := range []struct {
		share float64
		want  time.Duration
		rate  float64 // requests over the time spares are kept, a minute
	}{
		// None may wait, nor can 4 of 100 (not one push): the sample
		// does not say how long a quiet to bridge, so twice the longest,
		// all 100 served over 1+2+…+20 = 210 minutes.
		{0, 40 * time.Minute, 100.0 / 210},
		{0.04, 40 * time.Minute, 100.0 / 210},
		// 5 of 100 may: the push after 20 minutes waits; spares for 19
		// minutes after a request serve 95 over 1+…+19 + 19 = 209.
		{0.05, 19 * time.Minute, 95.0 / 209},
		// 14 of 100 may: two pushes (10), not three.
		{0.14, 18 * time.Minute, 90.0 / (171 + 2*18)},
	} {
		got, rate := d.activeFor(tc.share)
		if got != tc.want || math.Abs(rate*60-tc.rate) > 1e-9 {
			t.Errorf("activeFor(%v) = %s, %.4f/min; want %s, %.4f/min", tc.share, got, rate*60, tc.want, tc.rate)
		}
	}
	// Fewer than minGaps pushes tell nothing.
	if got, rate := pushes(quiets[:minGaps], sizes).activeFor(0.05); got != 0 || rate != 0 {
		t.Errorf("%d pushes, %d quiets: activeFor %s, %v; want 0, 0", minGaps, minGaps-1, got, rate)
	}
	// Only the latest gapSamples are kept.
	d = newDemand(t0)
	for k := range gapSamples + 10 {
		d.arrival(t0.Add(time.Duration(k) * time.Hour))
	}
	if len(d.Gaps) != gapSamples {
		t.Errorf("%d gaps kept, want %d", len(d.Gaps), gapSamples)
	}
}

// The outcomes: the share of requests missed though the pool meant to
// serve them is the late ones less what the idle rule was allotted, with a
// memory of about outcomeMemory requests.
func TestMissedShare(t *testing.T) {
	d := newDemand(t0)
	for k := range minOutcomes - 1 {
		d.requested(k%10 == 0, 0.1)
		d.served(k%10 == 0 || k%10 == 1)
	}
	if got := d.missedShare(); got != -1 {
		t.Errorf("%d requests: missed share %v, want -1 (not yet known)", minOutcomes-1, got)
	}
	// One in ten allotted to idling (and idling cost just that), two in
	// ten waited: one in ten missed.
	for k := range 5000 {
		d.requested(k%10 == 0, 0.1)
		d.served(k%10 == 0 || k%10 == 1)
	}
	if got := d.missedShare(); math.Abs(got-0.1) > 0.005 {
		t.Errorf("missed share %v, want about 0.1", got)
	}
	// None late for a long while: the old misses are forgotten.
	for range 7 * outcomeMemory {
		d.requested(false, 0)
		d.served(false)
	}
	if got := d.missedShare(); got > 0.001 {
		t.Errorf("missed share %v after %d requests served at once, want about 0", got, 7*outcomeMemory)
	}
	// More allotted than late (served by a release): none missed.
	d.Late, d.Allowed = 1, 50
	if got := d.missedShare(); got != 0 {
		t.Errorf("missed share %v, want 0", got)
	}
}

// Idling that costs more than its allotment shows as missed, so the budget
// left for it shrinks: 1% allotted, 3% of requests waited on purpose.
func TestMissedShareCountsWhatIdlingCost(t *testing.T) {
	d := newDemand(t0)
	for k := range 5000 {
		deliberate := k%100 < 3
		d.requested(deliberate, 0.01)
		d.served(deliberate)
	}
	if got := d.missedShare(); got < 0.018 || got > 0.022 {
		t.Errorf("missed share %v, want about 0.02 (3%% late, 1%% allotted)", got)
	}
}

func TestBootQuantilesAndFrees(t *testing.T) {
	d := newDemand(t0)
	if p50, p90 := d.bootQuantiles(); p50 != defaultBoot || p90 != defaultBoot {
		t.Errorf("no boots seen: %s, %s; want the default %s", p50, p90, defaultBoot)
	}
	for i := 1; i <= 100; i++ {
		d.observeBoot(time.Duration(i) * time.Second)
	}
	// Only the last 32 are kept: 69s … 100s.
	if p50, p90 := d.bootQuantiles(); p50 != 84*time.Second || p90 != 97*time.Second {
		t.Errorf("boots 69..100s: p50 %s, p90 %s; want 84s, 97s", p50, p90)
	}

	if got := d.expectedFrees([]time.Duration{time.Minute}, time.Minute); got != 0 {
		t.Errorf("no lease durations seen: frees %v, want 0", got)
	}
	// Leases last 1..10 minutes, evenly.
	for i := 1; i <= 10; i++ {
		d.observeLease(time.Duration(i) * time.Minute)
	}
	for _, tc := range []struct {
		ages []time.Duration
		w    time.Duration
		want float64
	}{
		{[]time.Duration{0}, time.Minute, 0.1},                         // of 10 longer than 0, 1 ends within a minute
		{[]time.Duration{9*time.Minute + time.Second}, time.Minute, 1}, // the one longer ends within
		{[]time.Duration{5 * time.Minute}, 2 * time.Minute, 0.4},       // of 6,7,8,9,10: 6 and 7
		{[]time.Duration{11 * time.Minute}, time.Minute, 0},            // older than any seen
		{[]time.Duration{0, 5 * time.Minute}, 2 * time.Minute, 0.2 + 0.4},
		// 1m: of 2..10, 2 and 3 end within 2 minutes.
		{[]time.Duration{0, time.Minute, 5 * time.Minute, 11 * time.Minute}, 2 * time.Minute, 0.2 + 2.0/9 + 0.4},
		{[]time.Duration{0}, 0, 0},
	} {
		if got := d.expectedFrees(tc.ages, tc.w); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("expectedFrees(%v, %s) = %v, want %v", tc.ages, tc.w, got, tc.want)
		}
	}
}

// The stored record reads back as the same history; one of another shape
// (an older version's) is not used.
func TestDemandRecord(t *testing.T) {
	d := newDemand(t0)
	for k := range 50 {
		d.arrival(t0.Add(time.Duration(k) * 37 * time.Second))
	}
	d.observeBoot(42 * time.Second)
	d.observeLease(7 * time.Minute)
	for k := range 300 {
		d.requested(k%7 == 0, 0.02)
		d.served(k%5 == 0)
	}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	var back *demand
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	a := newAutoscaler(AutoscaleSpec{}, back, t0.Add(time.Hour))
	now := t0.Add(40 * time.Minute)
	if a.demand.Start != t0 || a.demand.recentRate(now) != d.recentRate(now) || len(a.demand.BootS) != 1 || len(a.demand.LeaseS) != 1 {
		t.Errorf("restored history differs: %+v", a.demand)
	}
	// The quiets and the outcomes too: a restart keeps ActiveFor and what
	// the sizing missed.
	gotFor, gotRate := a.demand.activeFor(0.05)
	wantFor, wantRate := d.activeFor(0.05)
	if gotFor != wantFor || gotRate != wantRate || wantFor == 0 || a.demand.missedShare() != d.missedShare() || d.missedShare() <= 0 {
		t.Errorf("restored activeFor %s, %v, missed %v; want %s, %v, %v", gotFor, gotRate, a.demand.missedShare(), wantFor, wantRate, d.missedShare())
	}
	back.Minutes.Counts = back.Minutes.Counts[:10]
	if a := newAutoscaler(AutoscaleSpec{}, back, t0.Add(time.Hour)); a.demand.Start != t0.Add(time.Hour) {
		t.Errorf("a record of another shape was used: start %s", a.demand.Start)
	}
	if a := newAutoscaler(AutoscaleSpec{}, nil, t0); a.demand == nil || a.demand.Start != t0 {
		t.Errorf("no record: %+v", a.demand)
	}
}
