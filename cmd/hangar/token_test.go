package main

import (
	"context"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

// stealScript is what a hostile build does on a local-cloud instance (where
// builds run as the bootstrap's user): it looks for the bootstrap token in
// the environment of every process of its instance and in the bootstrap's
// token file, and prints what it finds.
const stealScript = `
for f in /proc/[0-9]*/environ; do
	e=$(tr '\0' '\n' <"$f" 2>/dev/null) || continue
	case $e in *"HANGAR_LOCAL_INSTANCE_ID=$HANGAR_LOCAL_INSTANCE_ID"*)
		printf '%s\n' "$e" | sed -n 's/^HANGAR_BOOTSTRAP_TOKEN=/environ-token=/p' ;;
	esac
done
echo "file-token=$(cut -d' ' -f2 "$HANGAR_ROOT/var/lib/hangar/bootstrap-token")"
`

var fileToken = regexp.MustCompile(`(?m)^file-token=(\S+)$`)

// TestStolenTokenDiesWithLease: a build finds no bootstrap token in any
// process's environment; the one it can read from the bootstrap's file is
// refused once its lease has ended, so it cannot long-poll for the next
// lease's worker password.
func TestStolenTokenDiesWithLease(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "max_instances = 1\nmin_idle = 1"), nil)
	srv := "--server=" + ts.url
	testutil.Eventually(t, "a warm instance", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 1 })

	code, out, errOut := runCLI(t, srv, "run", "-q", "demo", "--", "bash", "-c", stealScript)
	if code != 0 {
		t.Fatalf("hangar run: exit %d: %s", code, errOut)
	}
	if strings.Contains(out, "environ-token=") {
		t.Errorf("a process of the instance has the bootstrap token in its environment:\n%s", out)
	}
	m := fileToken.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("the build did not find the token file:\n%s", out)
	}
	stolen := m[1]

	// The instance is back in the pool, with a token the build never saw.
	testutil.Eventually(t, "the instance to be idle again", 30*time.Second, func() bool {
		list := ts.instances(t, "demo")
		return len(list) == 1 && list[0].State == pool.Idle && list[0].Uses == 1
	})
	req, _ := http.NewRequestWithContext(context.Background(), "GET", ts.url+"/bootstrap/v1/assignment?wait=0s&rotate=1", nil)
	req.Header.Set("Authorization", "Bearer "+stolen)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("the stolen token polling for the next assignment: HTTP %d, want 401", resp.StatusCode)
	}
	// And the instance still works for the next build.
	code, out, errOut = runCLI(t, srv, "run", "-q", "demo", "--", "echo", "next build")
	if code != 0 || out != "next build\n" {
		t.Fatalf("next build: exit %d, %q, %s", code, out, errOut)
	}
	if strings.Contains(ts.logs.String(), stolen) {
		t.Error("a bootstrap token reached the server log")
	}
}
