package sim

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"time"
)

// Boot is how long the simulated cloud's instances take from launch (or
// start) to their bootstrap's ready report: a fixed time, or samples drawn
// with a seeded generator from observed boot times.
type Boot struct {
	Fixed   time.Duration
	Samples []time.Duration // when set, Fixed is unused
}

// Mean is the boot time the oracle charges for every boot.
func (b Boot) Mean() time.Duration {
	if len(b.Samples) == 0 {
		return b.Fixed
	}
	var sum float64
	for _, s := range b.Samples {
		sum += float64(s)
	}
	return time.Duration(sum / float64(len(b.Samples)))
}

func (b Boot) String() string {
	if len(b.Samples) == 0 {
		return b.Fixed.String()
	}
	return fmt.Sprintf("%d samples, mean %s", len(b.Samples), b.Mean().Round(time.Millisecond))
}

func (b Boot) sample(r *rand.Rand) time.Duration {
	if len(b.Samples) == 0 {
		return b.Fixed
	}
	return b.Samples[r.IntN(len(b.Samples))]
}

// ReadBootDist reads a distribution of boot times: one number of seconds
// a line, as observed (hangar_boot_seconds, a cloud's logs). Blank lines
// and lines starting with # are skipped, and a first line that is not a
// number is a header. Errors name the file and the line.
func ReadBootDist(r io.Reader, name string) ([]time.Duration, error) {
	var out []time.Duration
	sc := bufio.NewScanner(r)
	line, first := 0, true
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		d, err := seconds(s)
		if err != nil && first && !startsNumeric(s) {
			first = false
			continue // a header
		}
		first = false
		if err != nil {
			return nil, fmt.Errorf("boot distribution %s:%d: %w", name, line, err)
		}
		if d <= 0 {
			return nil, fmt.Errorf("boot distribution %s:%d: a boot takes some time, not %s", name, line, s)
		}
		out = append(out, d)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading boot distribution %s: %w", name, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("boot distribution %s: no boot times; want one number of seconds a line", name)
	}
	return out, nil
}

func startsNumeric(s string) bool {
	c := s[0]
	return c >= '0' && c <= '9' || c == '-' || c == '+' || c == '.'
}
