package configs

import (
	"testing"
	"time"
)

// min_idle = "auto" and a [pools.NAME.autoscale] table go together; the
// table's keys have defaults.
func TestPoolAutoscale(t *testing.T) {
	for _, tc := range []struct {
		name, toml  string
		min         MinIdle
		wait        time.Duration
		maxIdle     int
		noAutoscale bool
	}{{
		name: "a number", toml: base + "min_idle = 2\n",
		min: MinIdle{N: 2}, noAutoscale: true, maxIdle: 4,
	}, {
		name: "not set", toml: base,
		min: MinIdle{}, noAutoscale: true, maxIdle: 4,
	}, {
		name: "auto with every key", toml: base + "min_idle = \"auto\"\n[pools.demo.autoscale]\ntarget_wait_p95 = \"10s\"\nmax_idle = 3\n",
		min: MinIdle{Auto: true}, wait: 10 * time.Second, maxIdle: 3,
	}, {
		name: "auto with the defaults: max_instances caps max_idle", toml: base + "min_idle = \"auto\"\n[pools.demo.autoscale]\n",
		min: MinIdle{Auto: true}, wait: 5 * time.Second, maxIdle: 4,
	}, {
		name: "auto with the defaults: max_idle is 20 at most", toml: base + "min_idle = \"auto\"\nmax_instances = 50\nautoscale = {}\n",
		min: MinIdle{Auto: true}, wait: 5 * time.Second, maxIdle: 20,
	}, {
		name: "max_idle 0 is allowed", toml: base + "min_idle = \"auto\"\nautoscale = { max_idle = 0, target_wait_p95 = \"0s\" }\n",
		min: MinIdle{Auto: true}, wait: 0, maxIdle: 0,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("hangar.toml", []byte(tc.toml))
			if err != nil {
				t.Fatal(err)
			}
			p := c.Pools["demo"]
			if p.MinIdle != tc.min || p.MaxIdleOf() != tc.maxIdle {
				t.Errorf("min_idle %+v, max_idle %d; want %+v, %d", p.MinIdle, p.MaxIdleOf(), tc.min, tc.maxIdle)
			}
			if a := p.Autoscale; (a == nil) != tc.noAutoscale || a != nil && a.TargetWaitP95.Duration != tc.wait {
				t.Errorf("autoscale %+v, want none: %v, target_wait_p95 %s", a, tc.noAutoscale, tc.wait)
			}
		})
	}
}

func TestPoolAutoscaleErrors(t *testing.T) {
	for _, tc := range []struct {
		name, toml, want string
	}{{
		name: "auto without the table",
		toml: base + "min_idle = \"auto\"\n",
		want: `hangar.toml:5: pools.demo.min_idle: "auto" needs a [pools.demo.autoscale] table (target_wait_p95, max_idle)`,
	}, {
		name: "the table without auto",
		toml: base + "min_idle = 1\n[pools.demo.autoscale]\nmax_idle = 2\n",
		want: `hangar.toml:6: pools.demo.autoscale: is only used with min_idle = "auto"`,
	}, {
		name: "the table without min_idle",
		toml: base + "autoscale = { max_idle = 2 }\n",
		want: `hangar.toml:5: pools.demo.autoscale: is only used with min_idle = "auto"`,
	}, {
		name: "another word",
		toml: base + "min_idle = \"automatic\"\n",
		want: `hangar.toml:5: pools.demo.min_idle: must be an integer or "auto", not "automatic"`,
	}, {
		name: "another type",
		toml: base + "min_idle = 1.5\n",
		want: `hangar.toml:5: pools.demo.min_idle: must be an integer or "auto", not a float`,
	}, {
		name: "a negative number",
		toml: base + "min_idle = -1\n",
		want: `hangar.toml:5: pools.demo.min_idle: must not be negative`,
	}, {
		name: "max_idle over max_instances",
		toml: base + "min_idle = \"auto\"\nmax_instances = 3\n[pools.demo.autoscale]\nmax_idle = 4\n",
		want: `hangar.toml:8: pools.demo.autoscale.max_idle: must be ≤ max_instances (3)`,
	}, {
		name: "max_idle over the default max_instances",
		toml: base + "min_idle = \"auto\"\nautoscale = { max_idle = 20 }\n",
		want: `hangar.toml:6: pools.demo.autoscale.max_idle: must be ≤ max_instances (4)`,
	}, {
		name: "negative values, bad types, unknown keys",
		toml: base + "min_idle = \"auto\"\n[pools.demo.autoscale]\nmax_idle = -2\ntarget_wait_p95 = \"-5s\"\ntarget_wait = \"5s\"\n" +
			"[pools.b]\nprovider = \"local\"\nmin_idle = \"auto\"\nautoscale = { max_idle = \"many\", target_wait_p95 = \"5 seconds\" }\n",
		want: `hangar.toml:7: pools.demo.autoscale.max_idle: must not be negative
hangar.toml:8: pools.demo.autoscale.target_wait_p95: must not be negative
hangar.toml:9: pools.demo.autoscale.target_wait: unknown key
hangar.toml:13: pools.b.autoscale.max_idle: must be an integer, not a string
hangar.toml:13: pools.b.autoscale.target_wait_p95: invalid duration "5 seconds": use a number and a unit, e.g. "90s", "5m", "1h"`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("hangar.toml", []byte(tc.toml))
			if err == nil || err.Error() != tc.want {
				t.Errorf("got:\n%v\nwant:\n%s", err, tc.want)
			}
		})
	}
}

// The EC2 example shows an autoscaled pool.
func TestExampleAutoscale(t *testing.T) {
	c, err := Load("ec2.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	p := c.Pools["linux"]
	if !p.MinIdle.Auto || p.Autoscale == nil || p.Autoscale.TargetWaitP95.Duration != 5*time.Second || p.MaxIdleOf() != 10 {
		t.Errorf("linux: min_idle %+v, autoscale %+v", p.MinIdle, p.Autoscale)
	}
}
