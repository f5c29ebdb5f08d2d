/*
 * Compatibility patch for the Pub/Sub emulator 0.8.20 (google-cloud-cli-pubsub-emulator 528.0.0).
 *
 * Its fat jar bundles a grpc-core that calls InternalStatus.asRuntimeException(Status, Metadata,
 * boolean), next to an older grpc-api whose InternalStatus lacks that method. Every time a
 * streaming pull ends (a subscriber stops or dies), the server's stream-closed handler throws
 * NoSuchMethodError, the stream is never unregistered, and the emulator goes on routing messages
 * to it and keeps its leased messages. This class, placed before the jar on the classpath,
 * provides both the old and the new method, so closed streams are cleaned up as in Pub/Sub.
 */
package io.grpc;

public final class InternalStatus {
  private InternalStatus() {}

  public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;

  public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

  public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(Status status, Metadata trailers) {
    return new StatusRuntimeException(status, trailers);
  }

  public static StatusRuntimeException asRuntimeException(
      Status status, Metadata trailers, boolean fillInStackTrace) {
    return new StatusRuntimeException(status, trailers);
  }
}
