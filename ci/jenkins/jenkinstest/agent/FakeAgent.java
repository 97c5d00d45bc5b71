import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.WebSocket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.Base64;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;

/**
 * Stands in for Jenkins's agent.jar in Hangar's tests: it takes the options
 * of an inbound WebSocket agent (-url, -name, -secret, with remoting's
 * "@file" form, -webSocket, -workDir), pings URL/login and connects to
 * URL/wsagents/ with the Node-Name, Secret-Key and X-Remoting-Capability
 * headers, as hudson.remoting.Engine does, and holds the connection until
 * it is closed, then connects again. It speaks no remoting protocol and runs
 * no builds. For the test's eyes it also sends its arguments
 * (X-Test-Agent-Argv) and the permissions of the secret's file
 * (X-Test-Secret-File-Mode).
 */
public class FakeAgent {
    public static void main(String[] args) throws Exception {
        String url = null, name = null, secret = null, workDir = null, secretMode = "";
        boolean webSocket = false;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("-webSocket")) {
                webSocket = true;
                continue;
            }
            if (i + 1 >= args.length) {
                fail("option " + a + " needs a value");
            }
            switch (a) {
                case "-url": url = args[++i]; break;
                case "-name": name = args[++i]; break;
                case "-secret": secret = args[++i]; break;
                case "-workDir": workDir = args[++i]; break;
                default: fail("unknown option " + a);
            }
        }
        if (url == null || name == null || secret == null) {
            fail("-url, -name and -secret are required");
        }
        if (!webSocket) {
            fail("only -webSocket agents are faked");
        }
        if (secret.startsWith("@")) {
            Path file = Paths.get(secret.substring(1));
            secretMode = PosixFilePermissions.toString(Files.getPosixFilePermissions(file));
            secret = Files.readString(file, StandardCharsets.UTF_8).trim();
        }
        if (workDir != null) {
            Files.createDirectories(Paths.get(workDir, "remoting"));
        }
        if (!url.endsWith("/")) {
            url += "/";
        }
        String argv = Base64.getEncoder().encodeToString(String.join("\0", args).getBytes(StandardCharsets.UTF_8));
        HttpClient client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).build();
        while (true) {
            try {
                HttpResponse<Void> ping = client.send(HttpRequest.newBuilder(URI.create(url + "login")).build(),
                        HttpResponse.BodyHandlers.discarding());
                if (ping.statusCode() != 200) {
                    System.out.println("fake agent: " + url + "login is not ready: " + ping.statusCode());
                } else {
                    CompletableFuture<Void> closed = new CompletableFuture<>();
                    WebSocket.Listener listener = new WebSocket.Listener() {
                        @Override
                        public CompletionStage<?> onClose(WebSocket ws, int status, String reason) {
                            closed.complete(null);
                            return null;
                        }

                        @Override
                        public void onError(WebSocket ws, Throwable error) {
                            closed.complete(null);
                        }
                    };
                    client.newWebSocketBuilder()
                            .header("Node-Name", name)
                            .header("Secret-Key", secret)
                            .header("X-Remoting-Capability", "fake")
                            .header("X-Test-Agent-Argv", argv)
                            .header("X-Test-Secret-File-Mode", secretMode)
                            .buildAsync(URI.create(url.replaceFirst("^http", "ws") + "wsagents/"), listener)
                            .join();
                    System.out.println("fake agent: " + name + " connected");
                    closed.join();
                    System.out.println("fake agent: " + name + " disconnected");
                }
            } catch (Exception e) {
                System.out.println("fake agent: connecting failed: " + e);
            }
            Thread.sleep(1000);
        }
    }

    private static void fail(String message) {
        System.err.println("fake agent: " + message);
        System.exit(2);
    }
}
