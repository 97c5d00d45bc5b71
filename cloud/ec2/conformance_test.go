package ec2

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/cloudtest"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/cloud/local"
)

// TestConformanceLocalBackend runs the provider contract through the real
// SDK against ec2test, whose instances run on the local cloud: user-data
// really boots and the console really shows what it printed.
func TestConformanceLocalBackend(t *testing.T) {
	hermetic(t)
	backend, err := local.New(context.Background(), local.Options{Dir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = backend.Close() })
	srv := newServer(t, ec2test.Options{Backend: backend})
	cloudtest.Run(t, func(t *testing.T) cloud.Provider {
		return newProvider(t, srv, nil)
	}, cloudtest.Options{Image: ec2test.DefaultImageID, InstanceTypes: []string{"t3.small", "t3a.small"}})
}

// TestConformance runs the contract against ec2test's in-memory instances,
// with boot and stop delays, capacity errors on the first instance type and
// 30% of all requests throttled. Its instances run nothing, so the console
// part is left to TestConformanceLocalBackend: the provider is wrapped to
// declare no console.
func TestConformance(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{BootDelay: 300 * time.Millisecond, StopDelay: 300 * time.Millisecond})
	srv.SetCapacity(func(typ, zone, market string) string {
		if typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	srv.Throttle("", 0.3)
	cloudtest.Run(t, func(t *testing.T) cloud.Provider {
		return noConsole{newProvider(t, srv, nil)}
	}, cloudtest.Options{Image: ec2test.DefaultImageID, InstanceTypes: []string{"t3.small", "t3a.small"}, Wait: time.Minute})
	t.Cleanup(func() {
		if srv.Errors()["DescribeInstances/RequestLimitExceeded"] == 0 {
			t.Error("no request was throttled; the test did not test throttling")
		}
	})
}

// TestConformanceRefusedFilters runs the contract against a cloud that
// answers DescribeInstances' client-token filter with an HTML 500, with
// capacity errors on the first instance type and 30% of all requests
// throttled. One provider serves every case, so the refusal must be found
// and logged once, and every multi-offering launch must still work.
func TestConformanceRefusedFilters(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{BootDelay: 300 * time.Millisecond, StopDelay: 300 * time.Millisecond})
	srv.RefuseFilter("client-token", ec2test.HTML500)
	srv.SetCapacity(func(typ, zone, market string) string {
		if typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	srv.Throttle("", 0.3)
	var logs logLines
	p := newProvider(t, srv, func(o *Options) { o.Logger = logs.logger() })
	cloudtest.Run(t, func(t *testing.T) cloud.Provider {
		return noConsole{p}
	}, cloudtest.Options{Image: ec2test.DefaultImageID, InstanceTypes: []string{"t3.small", "t3a.small"}, Wait: time.Minute})
	t.Cleanup(func() {
		if n := logs.count(refusedLog); n != 1 {
			t.Errorf("the refused filter was logged %d times, want once:\n%s", n, logs.buf.String())
		}
		if len(p.Notes()) != 1 {
			t.Errorf("Notes() = %q, want the refused client-token filter", p.Notes())
		}
		if srv.Errors()["DescribeInstances/HTML500"] == 0 {
			t.Error("no HTML 500 was answered; the test did not test a refused filter")
		}
	})
}

// noConsole hides the console of a cloud whose instances print nothing.
type noConsole struct{ *Provider }

func (n noConsole) Capabilities() cloud.Capabilities {
	c := n.Provider.Capabilities()
	c.ConsoleOutput = false
	return c
}

func (noConsole) ConsoleOutput(context.Context, string) ([]byte, error) {
	return nil, fmt.Errorf("console output: %w", cloud.ErrNotSupported)
}

// TestLiveConformance runs the contract against a real EC2 or EC2-compatible
// endpoint. It launches (and terminates) real, billed instances, so it runs
// only when HANGAR_TEST_EC2_ENDPOINT is set, with credentials and region
// from the standard AWS_* variables or profile:
//
//	HANGAR_TEST_EC2_ENDPOINT  e.g. https://ec2.eu-west-1.amazonaws.com
//	HANGAR_TEST_EC2_IMAGE     an image id or name pattern (see images.go)
//	HANGAR_TEST_EC2_TYPE      instance type(s), comma separated (default t3.micro)
//	HANGAR_TEST_EC2_SUBNET    subnet(s), comma separated (default: the default VPC)
//
// The image must run user-data as a shell script (cloud-init) for the
// console check.
func TestLiveConformance(t *testing.T) {
	endpoint := os.Getenv("HANGAR_TEST_EC2_ENDPOINT")
	if endpoint == "" {
		t.Skip("HANGAR_TEST_EC2_ENDPOINT not set: no live EC2 test")
	}
	img := os.Getenv("HANGAR_TEST_EC2_IMAGE")
	if img == "" {
		t.Fatal("HANGAR_TEST_EC2_IMAGE must name the image to launch")
	}
	types := splitList(os.Getenv("HANGAR_TEST_EC2_TYPE"))
	if len(types) == 0 {
		types = []string{"t3.micro"}
	}
	subnets := splitList(os.Getenv("HANGAR_TEST_EC2_SUBNET"))
	newP := func(t *testing.T) cloud.Provider {
		p, err := New(context.Background(), Options{Endpoint: endpoint, Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Close() })
		if len(subnets) == 0 {
			return p
		}
		return withSubnets{p, subnets}
	}
	cloudtest.Run(t, newP, cloudtest.Options{Image: img, InstanceTypes: types, Wait: 10 * time.Minute})
}

// withSubnets launches into the given subnets: cloudtest's specs name none.
type withSubnets struct {
	*Provider
	subnets []string
}

func (w withSubnets) Launch(ctx context.Context, spec cloud.LaunchSpec, n int) ([]cloud.Instance, error) {
	spec.Subnets = w.subnets
	return w.Provider.Launch(ctx, spec, n)
}

func splitList(s string) []string {
	var out []string
	for v := range strings.SplitSeq(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// TestStorageConformanceLocalBackend runs the storage contract through
// the real SDK against ec2test backed by the local cloud, so that volumes,
// snapshots and their copies hold real data; the second region shares the
// backend, as ec2test's regions do.
func TestStorageConformanceLocalBackend(t *testing.T) {
	hermetic(t)
	backend, err := local.New(context.Background(), local.Options{Dir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = backend.Close() })
	srv := newServer(t, ec2test.Options{Backend: backend, Regions: []string{"us-east-1", "eu-west-1"}})
	cloudtest.RunStorage(t, func(t *testing.T) cloud.Provider {
		return newProvider(t, srv, nil)
	}, cloudtest.StorageOptions{
		Image:         ec2test.DefaultImageID,
		InstanceTypes: []string{"t3.small"},
		Zone:          "us-east-1a",
		Wait:          time.Minute,
		OtherRegion: func(t *testing.T) cloud.Storage {
			return newProvider(t, srv, func(o *Options) { o.Region = "eu-west-1" })
		},
	})
}
