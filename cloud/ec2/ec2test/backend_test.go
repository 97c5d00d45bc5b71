package ec2test

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/local"
)

// newLocalBackend opens a local cloud in a temp dir and, at cleanup,
// terminates everything it runs.
func newLocalBackend(t *testing.T) *local.Provider {
	t.Helper()
	p, err := local.New(t.Context(), local.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("local.New: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		insts, err := p.List(ctx, nil)
		if err != nil {
			t.Errorf("cleanup: listing local instances: %v", err)
		}
		var ids []string
		for _, in := range insts {
			ids = append(ids, in.ID)
		}
		if _, err := p.Terminate(ctx, ids); err != nil {
			t.Errorf("cleanup: terminating local instances: %v", err)
		}
		p.Close()
	})
	return p
}

func localState(t *testing.T, p *local.Provider, id string) cloud.State {
	t.Helper()
	insts, err := p.List(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		if in.ID == id {
			return in.State
		}
	}
	return cloud.StateUnknown
}

// consoleOf polls GetConsoleOutput until it contains want.
func consoleOf(t *testing.T, s *Server, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		r := mustCall(t, s, "GetConsoleOutput", "InstanceId", id)
		out, err := base64.StdEncoding.DecodeString(r.root.get("output"))
		if err != nil {
			t.Fatalf("console output is not base64: %v", err)
		}
		if strings.Contains(string(out), want) {
			return string(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("console of %s never showed %q; last:\n%s", id, want, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLocalBackendRunsUserData(t *testing.T) {
	t.Parallel()
	p := newLocalBackend(t)
	s := newServer(t, Options{Backend: p})
	launch := []string{
		"InstanceType", "t3.small", "ClientToken", "intent-local",
		"UserData", b64("#!/bin/bash\necho \"user-data says $((6 * 7))\"\n"),
		"TagSpecification.1.ResourceType", "instance", "TagSpecification.1.Tag.1.Key", cloud.TagPool, "TagSpecification.1.Tag.1.Value", "demo",
	}
	r := run(t, s, 1, launch...)
	id := r.instanceIDs()[0]
	insts, err := p.List(t.Context(), map[string]string{cloud.TagPool: "demo"})
	if err != nil || len(insts) != 1 || insts[0].ID != id {
		t.Fatalf("local cloud runs %+v (%v), want the EC2 instance %s", insts, err, id)
	}
	if ip := r.root.get("instancesSet/item/privateIpAddress"); ip != insts[0].PrivateIP {
		t.Errorf("EC2 shows address %s, the local instance has %s", ip, insts[0].PrivateIP)
	}
	consoleOf(t, s, id, "user-data says 42")

	if again := run(t, s, 1, launch...).instanceIDs(); again[0] != id {
		t.Errorf("repeat launch returned %v, want %s", again, id)
	}
	if insts, _ := p.List(t.Context(), nil); len(insts) != 1 {
		t.Errorf("local cloud runs %d instances after a repeated launch, want 1", len(insts))
	}

	mustCall(t, s, "StopInstances", "InstanceId.1", id)
	if st := localState(t, p, id); st != cloud.StateStopped {
		t.Errorf("local instance is %s after StopInstances", st)
	}
	mustCall(t, s, "StartInstances", "InstanceId.1", id)
	if st := localState(t, p, id); st != cloud.StateRunning {
		t.Errorf("local instance is %s after StartInstances", st)
	}
	mustCall(t, s, "TerminateInstances", "InstanceId.1", id)
	if st := localState(t, p, id); st != cloud.StateTerminated {
		t.Errorf("local instance is %s after TerminateInstances", st)
	}
}

func TestLocalBackendRefusal(t *testing.T) {
	t.Parallel()
	s := newServer(t, Options{Backend: newLocalBackend(t)})
	// The local cloud runs shell and MIME user-data only.
	r := call(t, s, "RunInstances", "ImageId", DefaultImageID, "MinCount", "1", "MaxCount", "1", "UserData", b64("#cloud-config\n"))
	wantError(t, r, 500, "InternalError")
	if !strings.Contains(r.message(), "cloud-config") {
		t.Errorf("message %q does not say why", r.message())
	}
	if len(s.Instances()) != 0 {
		t.Errorf("a failed backend launch left instances")
	}
}
