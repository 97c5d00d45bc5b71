package sim

import (
	"bytes"
	"errors"
	"math"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// genRow is a parsed row of a generated trace.
type genRow struct {
	submit, duration float64
	pool             string
}

// generate runs Generate and parses what it wrote, failing the test on
// anything that is not a well-formed, sorted trace.
func generate(t *testing.T, o GenOptions) (string, []genRow) {
	t.Helper()
	var b bytes.Buffer
	if err := Generate(o, &b); err != nil {
		t.Fatalf("Generate: %v", err)
	}
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	wantHeader := "submit_s,duration_s"
	if len(o.Pools) > 0 {
		wantHeader += ",pool"
	}
	if lines[0] != wantHeader {
		t.Fatalf("header %q, want %q", lines[0], wantHeader)
	}
	rows := make([]genRow, 0, len(lines)-1)
	for i, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) != strings.Count(wantHeader, ",")+1 {
			t.Fatalf("line %d: %q has %d fields", i+2, l, len(f))
		}
		var r genRow
		var err1, err2 error
		r.submit, err1 = strconv.ParseFloat(f[0], 64)
		r.duration, err2 = strconv.ParseFloat(f[1], 64)
		if err := errors.Join(err1, err2); err != nil {
			t.Fatalf("line %d: %v", i+2, err)
		}
		if len(f) == 3 {
			r.pool = f[2]
		}
		if r.submit < 0 || r.duration <= 0 {
			t.Fatalf("line %d: %q: a negative submit or a duration not above 0", i+2, l)
		}
		if len(rows) > 0 && r.submit < rows[len(rows)-1].submit {
			t.Fatalf("line %d: %q comes before the line above it", i+2, l)
		}
		rows = append(rows, r)
	}
	return b.String(), rows
}

func TestGenerateIsDeterministic(t *testing.T) {
	o := DefaultGenOptions()
	o.Days = 2
	a, rows := generate(t, o)
	b, _ := generate(t, o)
	if a != b {
		t.Fatal("the same options wrote different traces")
	}
	if len(rows) < 500 {
		t.Fatalf("two days of the defaults have %d jobs; want hundreds", len(rows))
	}

	o.Seed = 2
	if c, _ := generate(t, o); c == a {
		t.Fatal("seeds 1 and 2 wrote the same trace")
	}

	// Durations draw from their own stream: other durations, the same
	// pushes, so two settings can be compared on one arrival process.
	o.Seed = 1
	o.MedianDuration, o.Sigma = 20*time.Minute, 0.3
	_, other := generate(t, o)
	if len(other) != len(rows) {
		t.Fatalf("other durations changed the number of jobs: %d, was %d", len(other), len(rows))
	}
	for i := range rows {
		if other[i].submit != rows[i].submit {
			t.Fatalf("row %d: other durations moved the submit time from %v to %v", i, rows[i].submit, other[i].submit)
		}
	}
	if other[0].duration == rows[0].duration {
		t.Fatalf("the duration parameters did not change the durations (%v)", rows[0].duration)
	}
}

// pushes groups rows with equal submit times: with Spread 0 each is one
// push's matrix.
func pushes(rows []genRow) (times []float64, sizes []int) {
	for i, r := range rows {
		if i > 0 && r.submit == rows[i-1].submit {
			sizes[len(sizes)-1]++
			continue
		}
		times = append(times, r.submit)
		sizes = append(sizes, 1)
	}
	return times, sizes
}

func within(t *testing.T, what string, got, want, tolerance float64) {
	t.Helper()
	if math.Abs(got-want) > tolerance*want {
		t.Errorf("%s = %.4g, want %.4g ± %.0f%%", what, got, want, tolerance*100)
	} else {
		t.Logf("%s = %.4g (model %.4g)", what, got, want)
	}
}

// TestGenerateFollowsTheModel checks eight weeks of the defaults against
// the numbers the model's documentation gives, worked out by hand here
// rather than from the code's own rate function. Tolerances are several
// standard deviations wide: the seed is fixed, so the test cannot flake,
// but it would fail for a model that is off.
func TestGenerateFollowsTheModel(t *testing.T) {
	o := DefaultGenOptions()
	o.Days = 56
	_, rows := generate(t, o)
	times, sizes := pushes(rows)

	// A weekday: 40/h × (0.05 × 24 h + 0.95 × 11 h × mean(sin²) = ½);
	// a weekend day 0.15 of that.
	weekday := 40 * (0.05*24 + 0.95*11*0.5)
	perWeek := 5*weekday + 2*0.15*weekday
	within(t, "pushes a week", float64(len(times))/8, perWeek, 0.04) // Poisson: sd 1%

	var days [56]int
	var hours [24]int
	for _, s := range times {
		days[int(s/86400)]++
		if int(s/86400)%7 < 5 {
			hours[int(s/3600)%24]++
		}
	}
	var wd, we float64
	for d, n := range days {
		if d%7 < 5 {
			wd += float64(n) / 40
		} else {
			we += float64(n) / 16
		}
	}
	within(t, "pushes a weekday", wd, weekday, 0.05)
	within(t, "pushes a weekend day", we, 0.15*weekday, 0.15)
	if we >= wd/3 {
		t.Errorf("a weekend day has %.0f pushes, a weekday %.0f: weekends are not quiet", we, wd)
	}
	// Working days peak at 13:30; nights are 5% of that.
	within(t, "weekday pushes 13:00–14:00 per day", float64(hours[13])/40, 40*(0.05+0.95*0.993), 0.08)
	within(t, "weekday pushes 02:00–03:00 per day", float64(hours[2])/40, 40*0.05, 0.3)

	// Fan-out: 30% single jobs, else 2–12, so 0.3 + 0.7 × 7 = 5.2 jobs a
	// push, submitted together.
	singles, most := 0, 0
	for _, n := range sizes {
		if n == 1 {
			singles++
		}
		most = max(most, n)
	}
	within(t, "share of single-job pushes", float64(singles)/float64(len(sizes)), 0.3, 0.06)
	within(t, "jobs a push", float64(len(rows))/float64(len(sizes)), 5.2, 0.03)
	if most != 12 {
		t.Errorf("the largest matrix has %d jobs, want 12", most)
	}

	// Durations: median 6 min; σ 0.8 puts the 84th percentile at e^0.8
	// times the median.
	d := make([]float64, len(rows))
	for i, r := range rows {
		d[i] = r.duration
	}
	slices.Sort(d)
	median := d[len(d)/2]
	within(t, "median duration (s)", median, 360, 0.03)
	within(t, "sigma", math.Log(d[len(d)*8413/10000]/median), 0.8, 0.05)
}

// TestGenerateUTCOffset: a team at UTC-5 peaks at 18:30 UTC, not 13:30.
func TestGenerateUTCOffset(t *testing.T) {
	o := DefaultGenOptions()
	o.Days, o.WeekendFactor, o.UTCOffset = 28, 1, -5*time.Hour
	_, rows := generate(t, o)
	times, _ := pushes(rows)
	var hours [24]int
	for _, s := range times {
		hours[int(s/3600)%24]++
	}
	busiest := 0
	for h, n := range hours {
		if n > hours[busiest] {
			busiest = h
		}
	}
	if busiest != 18 && busiest != 19 {
		t.Errorf("busiest UTC hour %d (counts %v), want 18 or 19", busiest, hours)
	}
	if hours[13] > hours[18]/2 {
		t.Errorf("13:00 UTC has %d pushes, 18:00 UTC %d: the offset did not move the day", hours[13], hours[18])
	}
}

func TestGenerateSpreadAndPools(t *testing.T) {
	o := DefaultGenOptions()
	o.Days = 14
	o.SingleJobProb, o.MatrixMin, o.MatrixMax = 0, 12, 12
	o.Spread = 20 * time.Second
	o.Pools = []PoolShare{{"linux", 7}, {"windows", 2}, {"macos", 1}}
	_, rows := generate(t, o)

	// Spread: a matrix's jobs are at different moments (but for the odd
	// two at the same millisecond, of 20,000), yet every job has company
	// within the spread: its matrix.
	count := map[string]int{}
	together := 0
	for i, r := range rows {
		count[r.pool]++
		if i > 0 && r.submit == rows[i-1].submit {
			together++
		}
		near := (i > 0 && r.submit-rows[i-1].submit <= 20) || (i+1 < len(rows) && rows[i+1].submit-r.submit <= 20)
		if !near {
			t.Fatalf("row %d at %v has no other job within 20 s: its matrix was not spread around it", i+1, r.submit)
		}
	}
	if together > len(rows)/100 {
		t.Errorf("%d of %d jobs are submitted at the same moment as the one before, despite a spread", together, len(rows))
	}
	for _, p := range o.Pools {
		within(t, "share of pool "+p.Name, float64(count[p.Name])/float64(len(rows)), p.Weight/10, 0.06)
	}
	if len(count) != 3 {
		t.Errorf("pools %v, want linux, windows and macos", count)
	}
}

func TestGenerateValidates(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*GenOptions)
		want   string
	}{
		{"no days", func(o *GenOptions) { o.Days = 0 }, "days must be more than 0 and at most 3660, not 0"},
		{"NaN days", func(o *GenOptions) { o.Days = math.NaN() }, "days must be more than 0 and at most 3660, not NaN"},
		{"too many days", func(o *GenOptions) { o.Days = 10000 }, "days must be more than 0 and at most 3660, not 10000"},
		{"negative rate", func(o *GenOptions) { o.PeakPushesPerHour = -1 }, "peak pushes per hour must be more than 0, not -1"},
		{"night above peak", func(o *GenOptions) { o.NightFactor = 1.5 }, "night factor must be between 0 and 1, not 1.5"},
		{"weekend", func(o *GenOptions) { o.WeekendFactor = -0.1 }, "weekend factor must be between 0 and 1, not -0.1"},
		{"hours reversed", func(o *GenOptions) { o.WorkStartHour, o.WorkEndHour = 19, 8 }, "working hours must satisfy 0 <= start < end <= 24, not 19–8"},
		{"hours past midnight", func(o *GenOptions) { o.WorkEndHour = 25 }, "working hours must satisfy 0 <= start < end <= 24, not 8–25"},
		{"offset", func(o *GenOptions) { o.UTCOffset = 15 * time.Hour }, "UTC offset must be between -14h and +14h, not 15h0m0s"},
		{"probability", func(o *GenOptions) { o.SingleJobProb = 2 }, "single-job probability must be between 0 and 1, not 2"},
		{"matrix reversed", func(o *GenOptions) { o.MatrixMin, o.MatrixMax = 5, 2 }, "matrix size must satisfy 1 <= min <= max <= 1000, not 5–2"},
		{"empty matrix", func(o *GenOptions) { o.MatrixMin = 0 }, "matrix size must satisfy 1 <= min <= max <= 1000, not 0–12"},
		{"spread", func(o *GenOptions) { o.Spread = -time.Second }, "spread must not be negative, not -1s"},
		{"median", func(o *GenOptions) { o.MedianDuration = 0 }, "median duration must be more than 0, not 0s"},
		{"sigma", func(o *GenOptions) { o.Sigma = math.Inf(1) }, "sigma must be between 0 and 5, not +Inf"},
		{"pool without name", func(o *GenOptions) { o.Pools = []PoolShare{{"", 1}} }, "pool 1 has no name"},
		{"pool with comma", func(o *GenOptions) { o.Pools = []PoolShare{{"a,b", 1}} }, `pool name "a,b" must not contain commas, quotes, line breaks or surrounding spaces`},
		{"pool twice", func(o *GenOptions) { o.Pools = []PoolShare{{"a", 1}, {"a", 2}} }, `pool "a" is named twice`},
		{"pool weight", func(o *GenOptions) { o.Pools = []PoolShare{{"a", 0}} }, `pool "a": weight must be more than 0, not 0`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := DefaultGenOptions()
			tc.change(&o)
			var b bytes.Buffer
			err := Generate(o, &b)
			if err == nil || err.Error() != "generating a trace: "+tc.want {
				t.Fatalf("error %v, want %q", err, "generating a trace: "+tc.want)
			}
			if b.Len() != 0 {
				t.Errorf("wrote %q despite the error", b.String())
			}
		})
	}
}

// TestGenerateValidatesAll: options that are wrong in several ways say all
// of it at once, one problem a line.
func TestGenerateValidatesAll(t *testing.T) {
	err := GenOptions{}.Validate()
	want := `days must be more than 0 and at most 3660, not 0
peak pushes per hour must be more than 0, not 0
working hours must satisfy 0 <= start < end <= 24, not 0–0
matrix size must satisfy 1 <= min <= max <= 1000, not 0–0
median duration must be more than 0, not 0s`
	if err == nil || err.Error() != want {
		t.Fatalf("error:\n%v\nwant:\n%s", err, want)
	}
	if err := DefaultGenOptions().Validate(); err != nil {
		t.Fatalf("the defaults are invalid: %v", err)
	}
}

type failingWriter struct{ after int }

var errDiskFull = errors.New("disk full")

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.after <= 0 {
		return 0, errDiskFull
	}
	w.after--
	return len(p), nil
}

func TestGenerateReportsWriteErrors(t *testing.T) {
	o := DefaultGenOptions()
	o.Days = 3
	err := Generate(o, &failingWriter{after: 1})
	if !errors.Is(err, errDiskFull) || !strings.HasPrefix(err.Error(), "writing trace: ") {
		t.Fatalf("error %v, want writing trace: disk full", err)
	}
}
