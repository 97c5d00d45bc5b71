package jenkinstest

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"testing"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// Python runs script with Debian's /usr/bin/python3 and its python3-jenkins
// client against s, and decodes what the script prints as JSON. The script
// finds a connected jenkins.Jenkins as `server`, and `json`. It skips the
// test when python3-jenkins is missing.
func (s *Server) Python(tb testing.TB, script string) map[string]any {
	tb.Helper()
	const python = "/usr/bin/python3"
	testutil.NeedPythonModule(tb, python, "jenkins", "a second Jenkins client checks the test server's shapes; install Debian's python3-jenkins")
	prelude := "import json, os, sys\nimport jenkins\n" +
		"server = jenkins.Jenkins(os.environ['JENKINS_URL'], username=os.environ['JENKINS_USER'], password=os.environ['JENKINS_TOKEN'], timeout=30)\n"
	cmd := exec.Command(python, "-c", prelude+script)
	cmd.Env = append(os.Environ(), "JENKINS_URL="+s.URL, "JENKINS_USER="+s.opts.User, "JENKINS_TOKEN="+s.opts.Token, "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			stderr = ee.Stderr
		}
		tb.Fatalf("python3-jenkins script failed: %v\n%s%s", err, out, stderr)
	}
	var v map[string]any
	if err := json.Unmarshal(out, &v); err != nil {
		tb.Fatalf("python3-jenkins script printed no JSON object: %v\n%s", err, out)
	}
	return v
}
