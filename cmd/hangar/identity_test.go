package main

import (
	"crypto/rand"
	"crypto/rsa"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

// identity = "signed" on the local cloud, whose metadata service signs
// identity documents with a key of its tree: a batch of three enrolls with
// its documents checked against the provider's own certificate; against a
// certificate of another key, each enrollment is refused (bad_identity)
// and no instance becomes ready.
func TestSignedIdentityLocal(t *testing.T) {
	t.Run("the provider's certificate", func(t *testing.T) {
		ts := startTest(t, testTOML(t.TempDir(), "demo", "min_idle = 3\nlaunch_batch = 3\nidentity = \"signed\""), nil)
		testutil.Eventually(t, "three idle instances", 90*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 3 })
		if n := strings.Count(ts.logs.String(), "instance enrolled"); n != 3 {
			t.Errorf("%d enrollments logged, want 3", n)
		}
	})
	t.Run("another key's certificate", func(t *testing.T) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		pem, err := identity.SelfSigned(key, "not the cloud")
		if err != nil {
			t.Fatal(err)
		}
		cert := filepath.Join(t.TempDir(), "other.pem")
		if err := os.WriteFile(cert, pem, 0o600); err != nil {
			t.Fatal(err)
		}
		ts := startTest(t, testTOML(t.TempDir(), "demo", "min_idle = 3\nlaunch_batch = 3\nidentity = \"signed\"\nidentity_certificate = \""+cert+"\""), nil)
		testutil.Eventually(t, "three refused enrollments", 90*time.Second, func() bool {
			return strings.Count(ts.logs.String(), "reason=bad_identity") >= 3
		})
		if n := ts.countState(t, "demo", pool.Idle); n != 0 {
			t.Errorf("%d instances ready though none could prove its identity", n)
		}
		if strings.Contains(ts.logs.String(), "instance enrolled") {
			t.Error("an instance enrolled with a document the certificate does not verify")
		}
	})
}
