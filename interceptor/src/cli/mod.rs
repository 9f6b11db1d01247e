//! One module per verb; each parses its arguments and calls the library.
pub mod attach;
pub mod detach;
pub mod logs;
pub mod register;
pub mod run;
pub mod stats;
pub mod status;
pub mod upgrade;
